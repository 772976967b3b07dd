// SPDX-License-Identifier: Apache-2.0
// The passes over the updates that the strategies are made of: the plan of the flat coordinate
// space, its split among threads, the vectorized loops (with AVX2 clones) and the server step.
#include "core/math/aggregate.hpp"
#include "core/math/aggregate_detail.hpp"
#include "core/math/noise.hpp"
#include "core/util/error.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <numeric>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <vector>

namespace fedl::core {

namespace aggregate_detail {

namespace {

// Coordinates per block of the weighted mean: 64 KiB of double accumulators, resident in L2.
constexpr std::size_t k_mean_block = 8192;
// Bytes of one thread's copy of a robust block (N updates × B coordinates): about L2's size.
constexpr std::size_t k_robust_bytes = std::size_t{1} << 20;
// A thread gets at least this many coordinates; smaller models run on fewer threads.
constexpr std::size_t k_min_per_thread = std::size_t{1} << 16;

} // namespace

// ---------------------------------------------------------------------------------------------
// The plan: every base tensor with its bytes in each update, its output and its state, laid out
// one after another as one flat coordinate space that threads split.

Plan
make_plan(const Safetensors& base, std::span<const Safetensors> updates)
{
  Plan plan;
  plan.n = updates.size();
  for (const auto& bt : base.tensors) {
    if (!is_float(bt.dtype)) {
      throw VerifyError("base model tensor {} is {}: fedl aggregates F32 and F64 tensors only", bt.name,
                        dtype_name(bt.dtype));
    }
    TensorPlan tp;
    tp.name = bt.name;
    tp.dtype = bt.dtype;
    tp.numel = bt.numel();
    tp.flat = plan.total;
    tp.base = bt.data.data();
    plan.total += tp.numel;
    plan.has_f32 = plan.has_f32 || bt.dtype == DType::f32;
    plan.has_f64 = plan.has_f64 || bt.dtype == DType::f64;
    plan.tensors.push_back(std::move(tp));
  }
  for (std::size_t i = 0; i < updates.size(); ++i) {
    const auto& u = updates[i];
    if (u.tensors.size() != base.tensors.size()) {
      throw VerifyError("update {} has {} tensors, the base model {}", i + 1, u.tensors.size(), base.tensors.size());
    }
    for (std::size_t k = 0; k < base.tensors.size(); ++k) {
      const auto& bt = base.tensors[k];
      const auto* ut = u.find(bt.name);
      if (ut == nullptr || ut->dtype != bt.dtype || ut->shape != bt.shape || ut->data.size() != bt.data.size()) {
        throw VerifyError("update {}: tensor {} is missing or differs in dtype or shape from the base model", i + 1,
                          bt.name);
      }
      plan.tensors[k].upd.push_back(ut->data.data());
    }
  }
  return plan;
}

namespace {

// Calls f(tensor, offset, count) for the pieces of the flat range [begin, end), each within one
// tensor and at most `block` coordinates long.
template<typename F>
void
for_each_piece(const Plan& plan, std::size_t begin, std::size_t end, std::size_t block, F&& f)
{
  std::size_t k = 0;
  while (begin < end && k < plan.tensors.size()) {
    const auto& tp = plan.tensors[k];
    const std::size_t tend = tp.flat + tp.numel;
    if (begin >= tend) {
      ++k;
      continue;
    }
    const std::size_t count = std::min({block, end - begin, tend - begin});
    f(tp, begin - tp.flat, count);
    begin += count;
  }
}

// Runs body(t, begin, end) for each thread t over an even split of [0, total), the cuts at
// multiples of k_lanes. Thread t = 0 is the caller. If a thread cannot be started its share runs
// on the caller, so the work is always done once. Rethrows the first exception of a body.
template<typename Body>
void
run_split(std::size_t total, unsigned threads, Body&& body)
{
  std::vector<std::size_t> cut(threads + 1);
  for (unsigned t = 0; t < threads; ++t) {
    cut[t] = std::min(total, total / threads * t / k_lanes * k_lanes);
  }
  cut[threads] = total;
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](unsigned t) {
    try {
      body(t, cut[t], cut[t + 1]);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  std::vector<unsigned> inline_shares;
  inline_shares.reserve(threads);
  for (unsigned t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(run, t);
    } catch (const std::system_error&) {
      inline_shares.push_back(t);
    }
  }
  run(0);
  for (const auto t : inline_shares) {
    run(t);
  }
  for (auto& th : pool) {
    th.join();
  }
  for (const auto& e : errors) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

} // namespace

unsigned
thread_count(const ServerOptions& options, std::size_t total)
{
  unsigned want = options.threads;
  if (want == 0) {
    want = std::max(1U, std::thread::hardware_concurrency());
  }
  const std::size_t cap = std::max<std::size_t>(1, total / k_min_per_thread);
  return static_cast<unsigned>(std::min<std::size_t>({want, cap, 256}));
}

// ---------------------------------------------------------------------------------------------
// Kernels.

namespace {

// acc[j] += Σ_k c_k · x_k[j] for four updates; the hot loop of the mean-type strategies.
template<typename T>
FEDL_CLONES void
axpy4(double* __restrict acc, const std::byte* __restrict x0, const std::byte* __restrict x1,
      const std::byte* __restrict x2, const std::byte* __restrict x3, const double* c, std::size_t count) noexcept
{
  const double c0 = c[0];
  const double c1 = c[1];
  const double c2 = c[2];
  const double c3 = c[3];
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      const std::size_t o = (j + k) * sizeof(T);
      acc[j + k] += c0 * static_cast<double>(load<T>(x0 + o)) + c1 * static_cast<double>(load<T>(x1 + o)) +
                    c2 * static_cast<double>(load<T>(x2 + o)) + c3 * static_cast<double>(load<T>(x3 + o));
    }
  }
  for (; j < count; ++j) {
    const std::size_t o = j * sizeof(T);
    acc[j] += c0 * static_cast<double>(load<T>(x0 + o)) + c1 * static_cast<double>(load<T>(x1 + o)) +
              c2 * static_cast<double>(load<T>(x2 + o)) + c3 * static_cast<double>(load<T>(x3 + o));
  }
}

template<typename T>
FEDL_CLONES void
axpy1(double* __restrict acc, const std::byte* __restrict x, double c, std::size_t count) noexcept
{
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      acc[j + k] += c * static_cast<double>(load<T>(x + (j + k) * sizeof(T)));
    }
  }
  for (; j < count; ++j) {
    acc[j] += c * static_cast<double>(load<T>(x + j * sizeof(T)));
  }
}

template<typename T>
FEDL_CLONES double
sum_squares(const std::byte* x, std::size_t count) noexcept
{
  std::array<double, k_lanes> acc{};
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      const auto v = static_cast<double>(load<T>(x + (j + k) * sizeof(T)));
      acc[k] += v * v;
    }
  }
  double s = 0;
  for (; j < count; ++j) {
    const auto v = static_cast<double>(load<T>(x + j * sizeof(T)));
    s += v * v;
  }
  return std::accumulate(acc.begin(), acc.end(), s);
}

template<typename T>
FEDL_CLONES double
squared_distance(const T* __restrict a, const T* __restrict b, std::size_t count) noexcept
{
  std::array<double, k_lanes> acc{};
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      const double d = static_cast<double>(a[j + k]) - static_cast<double>(b[j + k]);
      acc[k] += d * d;
    }
  }
  double s = 0;
  for (; j < count; ++j) {
    const double d = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    s += d * d;
  }
  return std::accumulate(acc.begin(), acc.end(), s);
}

// Σ x² of `count` values at x, and whether any has all exponent bits set (NaN or infinite): the
// checks of validate_update_values and update_norm, on values a pass has just brought into cache.
template<typename T, typename Bits, Bits ExponentMask>
FEDL_CLONES bool
tally_kernel(const std::byte* x, std::size_t count, double& sum) noexcept
{
  std::array<double, k_lanes> acc{};
  std::array<Bits, k_lanes> bad{};
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      const std::size_t o = (j + k) * sizeof(T);
      const auto v = static_cast<double>(load<T>(x + o));
      acc[k] += v * v;
      bad[k] |= static_cast<Bits>((load<Bits>(x + o) & ExponentMask) == ExponentMask);
    }
  }
  Bits any = 0;
  double s = 0;
  for (; j < count; ++j) {
    const std::size_t o = j * sizeof(T);
    const auto v = static_cast<double>(load<T>(x + o));
    s += v * v;
    any |= static_cast<Bits>((load<Bits>(x + o) & ExponentMask) == ExponentMask);
  }
  for (std::size_t k = 0; k < k_lanes; ++k) {
    any |= bad[k];
  }
  sum += std::accumulate(acc.begin(), acc.end(), s);
  return any != 0;
}

// acc[j] += row[j] for j < count, count a multiple of k_lanes.
template<typename T>
FEDL_CLONES void
add_row(double* __restrict acc, const T* __restrict row, std::size_t count) noexcept
{
  for (std::size_t j = 0; j < count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      acc[j + k] += static_cast<double>(row[j + k]);
    }
  }
}

// out[j] = base[j] + lr · acc[j] / denominator: every strategy without optimizer state.
template<typename T>
FEDL_CLONES void
step_plain(std::byte* __restrict out, const std::byte* __restrict base, const double* __restrict acc,
           double denominator, double lr, std::size_t count) noexcept
{
  std::size_t j = 0;
  for (; j + k_lanes <= count; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      const std::size_t o = (j + k) * sizeof(T);
      store<T>(out + o, static_cast<T>(static_cast<double>(load<T>(base + o)) + lr * (acc[j + k] / denominator)));
    }
  }
  for (; j < count; ++j) {
    const std::size_t o = j * sizeof(T);
    store<T>(out + o, static_cast<T>(static_cast<double>(load<T>(base + o)) + lr * (acc[j] / denominator)));
  }
}

template<typename T>
void
apply_step(const Step& s, const TensorPlan& tp, std::size_t off, const double* acc, double denominator,
           std::size_t count) noexcept
{
  const std::size_t o0 = off * sizeof(T);
  const std::byte* base = tp.base + o0;
  std::byte* out = tp.out + o0;
  switch (s.kind) {
  case Strategy::fedavgm:
    for (std::size_t j = 0; j < count; ++j) {
      const std::size_t o = j * sizeof(T);
      const double m = s.momentum * static_cast<double>(load<T>(tp.m + o0 + o)) + acc[j] / denominator;
      store<T>(tp.m + o0 + o, static_cast<T>(m));
      store<T>(out + o, static_cast<T>(static_cast<double>(load<T>(base + o)) + s.lr * m));
    }
    break;
  case Strategy::fedadam:
  case Strategy::fedyogi:
  case Strategy::fedadagrad:
    for (std::size_t j = 0; j < count; ++j) {
      const std::size_t o = j * sizeof(T);
      const double d = acc[j] / denominator;
      const double d2 = d * d;
      const double m = s.beta1 * static_cast<double>(load<T>(tp.m + o0 + o)) + (1.0 - s.beta1) * d;
      const double v_old = static_cast<double>(load<T>(tp.v + o0 + o));
      double v = 0;
      if (s.kind == Strategy::fedadam) {
        v = s.beta2 * v_old + (1.0 - s.beta2) * d2;
      } else if (s.kind == Strategy::fedyogi) {
        const double diff = v_old - d2;
        const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
        v = v_old - (1.0 - s.beta2) * d2 * sign;
      } else {
        v = v_old + d2;
      }
      store<T>(tp.m + o0 + o, static_cast<T>(m));
      store<T>(tp.v + o0 + o, static_cast<T>(v));
      const double x = static_cast<double>(load<T>(base + o)) + s.lr * m / (std::sqrt(v) + s.tau);
      store<T>(out + o, static_cast<T>(x));
    }
    break;
  default:
    step_plain<T>(out, base, acc, denominator, s.lr, count);
    break;
  }
}

// ---------------------------------------------------------------------------------------------
// Passes over the updates. Each thread owns its scratch, allocated before any thread starts, so
// that a pass cannot fail once it has begun to write.

std::vector<Reader>
make_readers(const Pass& pass, std::size_t slot_bytes, std::size_t slots)
{
  std::vector<Reader> readers;
  readers.reserve(pass.threads);
  for (unsigned t = 0; t < pass.threads; ++t) {
    readers.emplace_back(pass.access, pass.plan.n + 1, slot_bytes, slots);
  }
  return readers;
}

} // namespace

void
tally_values(ValueTally& tally, const std::byte* x, std::size_t count, DType dtype) noexcept
{
  const bool bad = dtype == DType::f32
                     ? tally_kernel<float, std::uint32_t, 0x7f800000U>(x, count, tally.sum_squares)
                     : tally_kernel<double, std::uint64_t, 0x7ff0000000000000ULL>(x, count, tally.sum_squares);
  tally.non_finite = tally.non_finite || bad;
  tally.bytes += count * dtype_size(dtype);
}

void
record_values(const Pass& pass, std::span<const Reader> readers)
{
  std::size_t update_bytes = 0;
  for (const auto& tp : pass.plan.tensors) {
    update_bytes += tp.numel * dtype_size(tp.dtype);
  }
  for (std::size_t i = 0; i < pass.plan.n; ++i) {
    ValueTally sum;
    for (const auto& r : readers) {
      const auto& t = r.tally(i);
      sum.bytes += t.bytes;
      sum.non_finite = sum.non_finite || t.non_finite;
      sum.sum_squares += t.sum_squares;
    }
    // A pass reads each coordinate of an update at most once (the threads' ranges are disjoint),
    // so all of its bytes means every value; one that read fewer (krum's mean of the chosen
    // updates) vouches for nothing.
    if (sum.bytes == update_bytes) {
      pass.values[i] = UpdateValues{true, !sum.non_finite, sum.sum_squares};
    }
  }
}

// ‖Δᵢ‖₂ of every update, streaming once over all of them.
std::vector<double>
norms_pass(const Pass& pass)
{
  const auto n = pass.plan.n;
  std::vector<std::vector<double>> partial(pass.threads, std::vector<double>(n, 0.0));
  auto readers = make_readers(pass, k_mean_block * sizeof(double), 1);
  run_split(pass.plan.total, pass.threads, [&](unsigned t, std::size_t begin, std::size_t end) {
    auto& sums = partial[t];
    auto& reader = readers[t];
    for_each_piece(pass.plan, begin, end, k_mean_block, [&](const TensorPlan& tp, std::size_t off, std::size_t count) {
      const std::size_t es = dtype_size(tp.dtype);
      for (std::size_t i = 0; i < n; ++i) {
        const std::byte* p = tp.upd[i] + off * es;
        const std::byte* x = reader.fetch(i, p, count * es, 0, tp.dtype);
        sums[i] += tp.dtype == DType::f32 ? sum_squares<float>(x, count) : sum_squares<double>(x, count);
        reader.consumed(i, p, count * es);
      }
    });
    reader.finish();
  });
  record_values(pass, readers);
  std::vector<double> norms(n, 0.0);
  for (const auto& p : partial) {
    for (std::size_t i = 0; i < n; ++i) {
      norms[i] += p[i];
    }
  }
  for (auto& x : norms) {
    x = std::sqrt(x);
  }
  return norms;
}

// out = the server step applied to Σ_k coef[k]·Δ_{which[k]} / denominator.
void
mean_pass(const Pass& pass, std::span<const std::size_t> which, std::span<const double> coef, double denominator,
          const Step& step)
{
  const auto& plan = pass.plan;
  std::vector<std::vector<double>> acc(pass.threads, std::vector<double>(k_mean_block));
  auto readers = make_readers(pass, k_mean_block * sizeof(double), 4);
  // Set up before the pass, which must not fail half-way (it writes the optimizer state).
  std::vector<std::optional<GaussianNoise>> noises(pass.threads);
  if (step.noise_std > 0) {
    for (unsigned t = 0; t < pass.threads; ++t) {
      noises[t].emplace(step.noise_seed != 0 ? step.noise_seed + t : 0);
    }
  }
  run_split(plan.total, pass.threads, [&](unsigned t, std::size_t begin, std::size_t end) {
    double* a = acc[t].data();
    auto& reader = readers[t];
    auto& noise = noises[t];
    for_each_piece(plan, begin, end, k_mean_block, [&](const TensorPlan& tp, std::size_t off, std::size_t count) {
      const std::size_t es = dtype_size(tp.dtype);
      const std::size_t bytes = count * es;
      std::fill(a, a + count, 0.0);
      std::size_t k = 0;
      for (; k + 4 <= which.size(); k += 4) {
        std::array<const std::byte*, 4> p{};
        std::array<const std::byte*, 4> x{};
        for (std::size_t g = 0; g < 4; ++g) {
          p[g] = tp.upd[which[k + g]] + off * es;
          x[g] = reader.fetch(which[k + g], p[g], bytes, g, tp.dtype);
        }
        if (tp.dtype == DType::f32) {
          axpy4<float>(a, x[0], x[1], x[2], x[3], coef.data() + k, count);
        } else {
          axpy4<double>(a, x[0], x[1], x[2], x[3], coef.data() + k, count);
        }
        for (std::size_t g = 0; g < 4; ++g) {
          reader.consumed(which[k + g], p[g], bytes);
        }
      }
      for (; k < which.size(); ++k) {
        const std::byte* p = tp.upd[which[k]] + off * es;
        const std::byte* x = reader.fetch(which[k], p, bytes, 0, tp.dtype);
        if (tp.dtype == DType::f32) {
          axpy1<float>(a, x, coef[k], count);
        } else {
          axpy1<double>(a, x, coef[k], count);
        }
        reader.consumed(which[k], p, bytes);
      }
      if (noise) {
        // The noisy sum, snapped to the noise's grid before the division (noise.hpp).
        noise->add_snapped(std::span(a, count), step.noise_std);
      }
      if (tp.dtype == DType::f32) {
        apply_step<float>(step, tp, off, a, denominator, count);
      } else {
        apply_step<double>(step, tp, off, a, denominator, count);
      }
      reader.consumed(plan.n, tp.base + off * es, bytes);
    });
    reader.finish();
  });
  record_values(pass, readers);
}

namespace {

// Per-thread scratch of the passes that copy a block of every update: an n × B matrix.
struct BlockScratch
{
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<float> column_f32; // for n > k_network_max
  std::vector<double> column_f64;
  std::vector<double> acc;
};

// Coordinates per block so that n rows of B values of `elem` bytes take about k_robust_bytes.
std::size_t
block_columns(std::size_t n, std::size_t elem)
{
  const std::size_t b = k_robust_bytes / (n * elem) / k_tile * k_tile;
  return std::max(b, k_tile);
}

// The distance between rows of a block: B plus one line of k_lanes values, so that the rows'
// tiles (B·4 bytes apart, often a multiple of 4 KiB) do not all fall into the same L1 cache sets.
std::size_t
row_stride(std::size_t n, std::size_t elem)
{
  return block_columns(n, elem) + k_lanes;
}

BlockScratch
make_block_scratch(const Plan& plan, bool sorts_each_column)
{
  BlockScratch s;
  const auto n = plan.n;
  if (plan.has_f32) {
    s.f32.resize(n * row_stride(n, sizeof(float)));
    if (sorts_each_column) {
      s.column_f32.resize(n);
    }
  }
  if (plan.has_f64) {
    s.f64.resize(n * row_stride(n, sizeof(double)));
    if (sorts_each_column) {
      s.column_f64.resize(n);
    }
  }
  s.acc.resize(
    std::max(plan.has_f32 ? block_columns(n, sizeof(float)) : 0, plan.has_f64 ? block_columns(n, sizeof(double)) : 0));
  return s;
}

// Copies coordinates [off, off + count) of every update into rows of `buf` (row stride B),
// scaled by scale[i], and zeroes the columns from count up to the next multiple of k_tile.
template<typename T>
void
gather(const TensorPlan& tp, std::size_t off, std::size_t count, std::size_t stride, std::span<const double> scale,
       T* buf, Reader& reader) noexcept
{
  const std::size_t padded = (count + k_tile - 1) / k_tile * k_tile;
  for (std::size_t i = 0; i < tp.upd.size(); ++i) {
    T* row = buf + i * stride;
    reader.copy(i, tp.upd[i] + off * sizeof(T), count * sizeof(T), reinterpret_cast<std::byte*>(row), tp.dtype);
    if (scale[i] != 1.0) {
      const double s = scale[i];
      for (std::size_t j = 0; j < count; ++j) {
        row[j] = static_cast<T>(static_cast<double>(row[j]) * s);
      }
    }
    std::fill(row + count, row + padded, T{0});
  }
}

// Runs block(buffer, column, stride, tensor, offset, count) over the thread's range in pieces of
// at most B coordinates, B chosen per dtype so that the n × B block fills the thread's buffer.
template<typename Block>
void
for_each_block(const Plan& plan, std::size_t begin, std::size_t end, BlockScratch& s, Block&& block)
{
  const std::size_t b32 = block_columns(plan.n, sizeof(float));
  const std::size_t b64 = block_columns(plan.n, sizeof(double));
  for_each_piece(plan, begin, end, std::max(b32, b64), [&](const TensorPlan& tp, std::size_t off, std::size_t count) {
    if (tp.dtype == DType::f32) {
      for (std::size_t o = 0; o < count; o += b32) {
        block(s.f32.data(), s.column_f32.data(), row_stride(plan.n, sizeof(float)), tp, off + o,
              std::min(b32, count - o));
      }
    } else {
      for (std::size_t o = 0; o < count; o += b64) {
        block(s.f64.data(), s.column_f64.data(), row_stride(plan.n, sizeof(double)), tp, off + o,
              std::min(b64, count - o));
      }
    }
  });
}

} // namespace

// Coordinate-wise median or trimmed mean: out = the server step applied to the mean of sorted
// rows [lo_row, hi_row) of each column (for the median, the one or two middle rows).
void
robust_pass(const Pass& pass, std::span<const double> scale, std::size_t lo_row, std::size_t hi_row, const Step& step)
{
  const auto& plan = pass.plan;
  const auto n = plan.n;
  const auto selection = middle_rows(n, lo_row, hi_row);
  std::vector<BlockScratch> scratch;
  scratch.reserve(pass.threads);
  for (unsigned t = 0; t < pass.threads; ++t) {
    scratch.push_back(make_block_scratch(plan, selection.sort_each));
  }
  auto readers = make_readers(pass, 0, 0);
  const double rows = static_cast<double>(hi_row - lo_row);
  run_split(plan.total, pass.threads, [&](unsigned t, std::size_t begin, std::size_t end) {
    auto& s = scratch[t];
    auto& reader = readers[t];
    for_each_block(
      plan, begin, end, s,
      [&]<typename T>(T* buf, T* column, std::size_t stride, const TensorPlan& tp, std::size_t off, std::size_t count) {
        gather<T>(tp, off, count, stride, scale, buf, reader);
        const std::size_t padded = (count + k_tile - 1) / k_tile * k_tile;
        select_columns_with(buf, n, stride, padded, selection, column);
        double* a = s.acc.data();
        std::fill(a, a + padded, 0.0);
        for (std::size_t r = lo_row; r < hi_row; ++r) {
          add_row(a, buf + r * stride, padded);
        }
        apply_step<T>(step, tp, off, a, rows, count);
        reader.consumed(n, tp.base + off * sizeof(T), count * sizeof(T));
      });
    reader.finish();
  });
  record_values(pass, readers);
}

// The n × n matrix of squared L2 distances between the (scaled) updates, row-major.
std::vector<double>
distance_pass(const Pass& pass, std::span<const double> scale)
{
  const auto& plan = pass.plan;
  const auto n = plan.n;
  std::vector<BlockScratch> scratch;
  std::vector<std::vector<double>> partial;
  scratch.reserve(pass.threads);
  partial.reserve(pass.threads);
  for (unsigned t = 0; t < pass.threads; ++t) {
    scratch.push_back(make_block_scratch(plan, false));
    partial.emplace_back(n * n, 0.0);
  }
  auto readers = make_readers(pass, 0, 0);
  run_split(plan.total, pass.threads, [&](unsigned t, std::size_t begin, std::size_t end) {
    auto& d = partial[t];
    auto& reader = readers[t];
    for_each_block(
      plan, begin, end, scratch[t],
      [&]<typename T>(T* buf, T*, std::size_t stride, const TensorPlan& tp, std::size_t off, std::size_t count) {
        gather<T>(tp, off, count, stride, scale, buf, reader);
        const std::size_t padded = (count + k_tile - 1) / k_tile * k_tile;
        for (std::size_t i = 0; i < n; ++i) {
          for (std::size_t j = i + 1; j < n; ++j) {
            d[i * n + j] += squared_distance(buf + i * stride, buf + j * stride, padded);
          }
        }
      });
    reader.finish();
  });
  record_values(pass, readers);
  std::vector<double> dist(n * n, 0.0);
  for (const auto& p : partial) {
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t j = i + 1; j < n; ++j) {
        dist[i * n + j] += p[i * n + j];
      }
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = i + 1; j < n; ++j) {
      dist[j * n + i] = dist[i * n + j];
    }
  }
  return dist;
}

} // namespace aggregate_detail

using namespace aggregate_detail;

double
update_norm(const Safetensors& update)
{
  double s = 0;
  for (const auto& t : update.tensors) {
    if (t.dtype == DType::f32) {
      s += sum_squares<float>(t.data.data(), t.numel());
    } else if (t.dtype == DType::f64) {
      s += sum_squares<double>(t.data.data(), t.numel());
    }
  }
  return std::sqrt(s);
}

} // namespace fedl::core
