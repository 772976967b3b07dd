// SPDX-License-Identifier: Apache-2.0
// Private to the aggregation sources (aggregate*.cpp): how the passes over the updates reach
// their bytes, in place or with pread() from the files that are mapped.
#pragma once

#include "core/format/safetensors.hpp"
#include "core/math/aggregate.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

// On x86-64 the hot loops are compiled twice, for the baseline (SSE2) and for AVX2, and the
// better one is chosen at load time (GCC function multiversioning; clang 14 cannot clone
// templates, so there only the sorting network has an AVX2 version); both do the same IEEE
// operations in the same order, so results do not depend on the machine.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FEDL_X86_64 1
#else
#define FEDL_X86_64 0
#endif
// Not under ThreadSanitizer (make tsan): GCC instruments the clones' IFUNC resolver too, and the
// dynamic loader runs it while relocating, before TSan's run time exists (a crash at start).
#if FEDL_X86_64 && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define FEDL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FEDL_CLONES
#endif

namespace fedl::core::aggregate_detail {

// Inner loops run over this many values at a time: a constant trip count that GCC vectorizes
// even at -O2 (whose cost model refuses loops that need a scalar epilogue).
constexpr std::size_t k_lanes = 16;
// Columns that one compare-exchange of the sorting network handles (a multiple of k_lanes).
constexpr std::size_t k_tile = 64;
// Past this many updates the columns are sorted one at a time (the network grows as N log² N).
constexpr std::size_t k_network_max = 4096;

// Unaligned-safe loads and stores: mapped tensor data is aligned only as the file lays it out.
// GCC turns these memcpy calls into plain (vectorizable) loads and stores.
template<typename T>
inline T
load(const std::byte* p) noexcept
{
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template<typename T>
inline void
store(std::byte* p, T v) noexcept
{
  std::memcpy(p, &v, sizeof v);
}

inline bool
is_float(DType d) noexcept
{
  return d == DType::f32 || d == DType::f64;
}

// The adaptive strategies, which keep a second moment v besides m.
inline bool
adaptive(Strategy s) noexcept
{
  return s == Strategy::fedadam || s == Strategy::fedyogi || s == Strategy::fedadagrad;
}

// `text` as an unsigned integer, all of it in decimal digits, or nothing.
template<typename U>
inline std::optional<U>
parse_unsigned(std::string_view text)
{
  U value{};
  const auto* end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || p != end) {
    return std::nullopt;
  }
  return value;
}

// A shape as text, e.g. [3,4] (aggregate.cpp).
std::string shape_text(const std::vector<std::int64_t>& shape);

// ---------------------------------------------------------------------------------------------
// Sorting columns (aggregate_kernels.cpp).

using Network = std::vector<std::pair<std::uint32_t, std::uint32_t>>;

// What to run on each column of a block: a comparator network, or (past k_network_max, where a
// network would be too long) a plain sort of each column.
struct Selection
{
  Network network;
  bool sort_each = false;
};

// Sorts each column completely.
Selection full_sort(std::size_t n);

// Leaves in rows [lo, hi) of each column the values that sorted rows [lo, hi) would hold, in some
// order.
Selection middle_rows(std::size_t n, std::size_t lo, std::size_t hi);

// Runs `selection` on `width` columns of the n × stride matrix `rows`. `column` is scratch for n
// values, used only when sorting column by column. For float and double.
template<typename T>
void select_columns_with(T* rows, std::size_t n, std::size_t stride, std::size_t width, const Selection& selection,
                         T* column) noexcept;

// ---------------------------------------------------------------------------------------------
// Reading the updates (aggregate_stream.cpp).

// Drops the pages of read-only file mappings that one thread has finished reading from the
// process's resident set (madvise MADV_DONTNEED: the kernel maps them again from the page cache
// if they are touched later). Only pages entirely inside what this thread consumed are dropped;
// pages shared with another thread's range stay. A no-op when disabled.
class PageReleaser
{
public:
  PageReleaser(bool enabled, std::size_t sources, std::size_t window)
    : m_enabled(enabled), m_window(window), m_spans(enabled ? sources : 0)
  {
  }
  PageReleaser(const PageReleaser&) = delete;
  PageReleaser& operator=(const PageReleaser&) = delete;
  PageReleaser(PageReleaser&&) = default;
  PageReleaser& operator=(PageReleaser&&) = default;
  ~PageReleaser() { flush_all(); }

  // Asks the kernel to map [p, p + size) with small pages only, not a 2 MiB page-cache folio as
  // one huge page: with the pages dropped piece by piece, that keeps measurably fewer resident.
  static void small_pages(const std::byte* p, std::size_t size) noexcept
  {
    const auto ps = page_size();
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    const auto lo = (a + ps - 1) / ps * ps;
    const auto hi = (a + size) / ps * ps;
    if (hi > lo) {
      // A failure only costs memory; nothing to report.
      ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_NOHUGEPAGE);
    }
  }

  // Records that bytes [p, p + size) of source `s` have been read for the last time.
  void consumed(std::size_t s, const std::byte* p, std::size_t size) noexcept
  {
    if (!m_enabled || size == 0) {
      return;
    }
    auto& span = m_spans[s];
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    if (a != span.hi) {
      release(span, false);
      span.lo = a;
    }
    span.hi = a + size;
    if (span.hi - span.lo >= m_window) {
      release(span, false);
    }
  }

  void flush_all() noexcept
  {
    for (auto& span : m_spans) {
      release(span, true);
    }
  }

private:
  struct Span
  {
    std::uintptr_t lo = 0;
    std::uintptr_t hi = 0;
  };

  static std::uintptr_t page_size() noexcept
  {
    static const auto size = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    return size;
  }

  static void release(Span& span, bool all) noexcept
  {
    const auto ps = page_size();
    const auto lo = (span.lo + ps - 1) / ps * ps;
    const auto hi = span.hi / ps * ps;
    if (hi > lo) {
      // A failure only means the pages stay resident; nothing to report.
      ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
      span.lo = hi;
    }
    if (all) {
      span = {};
    }
  }

  bool m_enabled = false;
  std::size_t m_window = 0;
  std::vector<Span> m_spans;
};

// How the passes reach the updates' bytes. A caller's buffers are read in place. For mapped
// files, the kernel maps a whole page-cache folio (up to 2 MiB on Linux 6.x) at a read fault, so
// reading N files in place keeps about N × threads × 2 MiB resident however soon pages are
// dropped. Updates are therefore read with pread() into small per-thread buffers, from a
// descriptor opened on the very file that is mapped (same device and inode), and only the base
// (one file, read once) and any update without such a descriptor are read in place, their pages
// dropped as they are consumed.
struct Access
{
  bool mapped = false;                  // the bytes are read-only file mappings
  std::vector<int> fds;                 // per update: a descriptor to pread from, or -1
  std::vector<const std::byte*> origin; // per update: the byte at file offset 0 of its mapping
  std::size_t window = 0;               // of the PageReleaser
};

// What one pass read of one update's values: how many bytes, whether any was NaN or infinite,
// and the sum of their squares (in the order read).
struct ValueTally
{
  std::size_t bytes = 0;
  bool non_finite = false;
  double sum_squares = 0;
};

// Adds `count` values of type `dtype` (F32 or F64) at x to `tally`, while they are in cache.
void tally_values(ValueTally& tally, const std::byte* x, std::size_t count, DType dtype) noexcept;

// One thread's access to the updates (sources 0..n-1) and the base (source n). Every value it
// hands out of an update is also tallied (ValueTally), so that a pass vouches for the updates it
// read in full without a pass of its own.
class Reader
{
public:
  Reader(const Access& access, std::size_t sources, std::size_t slot_bytes, std::size_t slots)
    : m_access(&access),
      m_releaser(access.mapped, sources, access.window),
      m_slots(slot_bytes * slots),
      m_slot_bytes(slot_bytes),
      m_tallies(sources > 0 ? sources - 1 : 0)
  {
  }

  // Values [p, p + size) of update i (of type `dtype`), where p points into its data: p itself,
  // or a copy in buffer `slot`, valid until that slot is used again. Call consumed() once they
  // have been used.
  const std::byte* fetch(std::size_t i, const std::byte* p, std::size_t size, std::size_t slot, DType dtype) noexcept
  {
    const std::byte* x = p;
    if (preads(i)) {
      std::byte* dest = m_slots.data() + slot * m_slot_bytes;
      read(i, p, size, dest);
      x = dest;
    }
    tally(i, x, size, dtype);
    return x;
  }

  // Copies values [p, p + size) of update i to `dest` (and counts them as consumed).
  void copy(std::size_t i, const std::byte* p, std::size_t size, std::byte* dest, DType dtype) noexcept
  {
    if (preads(i)) {
      read(i, p, size, dest);
    } else {
      std::memcpy(dest, p, size);
      m_releaser.consumed(i, p, size);
    }
    tally(i, dest, size, dtype);
  }

  // What this thread read of update i's values.
  const ValueTally& tally(std::size_t i) const noexcept { return m_tallies[i]; }

  // Records that bytes [p, p + size) of source s have been read for the last time.
  void consumed(std::size_t s, const std::byte* p, std::size_t size) noexcept
  {
    if (!preads(s)) {
      m_releaser.consumed(s, p, size);
    }
  }

  void finish() noexcept { m_releaser.flush_all(); }

private:
  bool preads(std::size_t i) const noexcept { return i < m_access->fds.size() && m_access->fds[i] >= 0; }

  void tally(std::size_t i, const std::byte* x, std::size_t size, DType dtype) noexcept
  {
    tally_values(m_tallies[i], x, size / dtype_size(dtype), dtype);
  }

  void read(std::size_t i, const std::byte* p, std::size_t size, std::byte* dest) noexcept
  {
    const auto offset = static_cast<off_t>(p - m_access->origin[i]);
    std::size_t done = 0;
    while (done < size) {
      const auto got = ::pread(m_access->fds[i], dest + done, size - done, offset + static_cast<off_t>(done));
      if (got > 0) {
        done += static_cast<std::size_t>(got);
      } else if (got < 0 && errno == EINTR) {
        continue;
      } else {
        break;
      }
    }
    if (done < size) {
      // The file cannot be read or has shrunk since it was mapped: take the rest from the
      // mapping, as a caller without descriptors would (a shrunk file then faults there).
      std::memcpy(dest + done, p + done, size - done);
    }
  }

  const Access* m_access;
  PageReleaser m_releaser;
  std::vector<std::byte> m_slots;
  std::size_t m_slot_bytes = 0;
  std::vector<ValueTally> m_tallies;
};

// The PageReleaser window for `sources` sources read by `threads` threads.
std::size_t release_window(std::size_t sources, unsigned threads);

// A descriptor for each update file that is the very file mapped (same device, inode and size,
// as /proc/self/maps lists the mapping), or -1 where that cannot be established. Closed on
// destruction.
class Descriptors
{
public:
  // Opens descriptors for the files with wanted[i] set.
  Descriptors(std::span<const SafetensorsFile* const> files, const std::vector<bool>& wanted);
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  ~Descriptors()
  {
    for (const int fd : m_fds) {
      if (fd >= 0) {
        ::close(fd);
      }
    }
  }
  const std::vector<int>& fds() const noexcept { return m_fds; }

private:
  std::vector<int> m_fds;
};

// ---------------------------------------------------------------------------------------------
// The passes over the updates (aggregate_passes.cpp).

struct TensorPlan
{
  std::string_view name;
  DType dtype = DType::f32;
  std::size_t numel = 0;
  std::size_t flat = 0; // index of its first coordinate in the flat space
  const std::byte* base = nullptr;
  std::vector<const std::byte*> upd;
  std::byte* out = nullptr;
  std::byte* m = nullptr;
  std::byte* v = nullptr;
};

struct Plan
{
  std::vector<TensorPlan> tensors;
  std::size_t total = 0;
  std::size_t n = 0;
  bool has_f32 = false;
  bool has_f64 = false;
};

// The server step for one piece: the aggregated update of coordinate off + j is
// acc[j] / denominator.
struct Step
{
  Strategy kind = Strategy::fedavg;
  double lr = 1.0;
  double momentum = 0.9;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double tau = 1e-3;
  // Client-level DP: Gaussian noise of this standard deviation added to each coordinate of the
  // weighted sum before it is divided (mean_pass only); 0: none. Seeded from noise_seed (plus
  // the thread's index), or from the OS if 0.
  double noise_std = 0;
  std::uint64_t noise_seed = 0;
};

struct Pass
{
  const Plan& plan;
  unsigned threads;
  const Access& access;
  // Per update: what the passes vouch for (AggregateInfo::values); set by record_values.
  std::vector<UpdateValues>& values;
};

// Records in pass.values, for each update that `readers` (one pass's, all threads) read in full
// and exactly once, its ValueTally summed over the threads.
void record_values(const Pass& pass, std::span<const Reader> readers);

Plan make_plan(const Safetensors& base, std::span<const Safetensors> updates);

unsigned thread_count(const ServerOptions& options, std::size_t total);

// ‖Δᵢ‖₂ of every update, streaming once over all of them.
std::vector<double> norms_pass(const Pass& pass);

// out = the server step applied to Σ_k coef[k]·Δ_{which[k]} / denominator.
void mean_pass(const Pass& pass, std::span<const std::size_t> which, std::span<const double> coef, double denominator,
               const Step& step);

// Coordinate-wise median or trimmed mean: out = the server step applied to the mean of sorted
// rows [lo_row, hi_row) of each column (for the median, the one or two middle rows).
void robust_pass(const Pass& pass, std::span<const double> scale, std::size_t lo_row, std::size_t hi_row,
                 const Step& step);

// The n × n matrix of squared L2 distances between the (scaled) updates, row-major.
std::vector<double> distance_pass(const Pass& pass, std::span<const double> scale);

} // namespace fedl::core::aggregate_detail
