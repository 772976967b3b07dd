// SPDX-License-Identifier: Apache-2.0
// DP-SGD: Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with
// Differential Privacy", CCS 2016; per-example gradients in one backward pass after Goodfellow,
// "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015. Written for fedl from the
// papers; see dp_sgd.hpp for what each function promises.
#include "backends/torch/dp_sgd.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <latch>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace fedl::backends::torch_backend::dp {

namespace {

namespace F = torch::nn::functional;

// The clip factor min(1, C / (norm + 1e-6)) of each example (Abadi et al., Algorithm 1; the
// 1e-6 keeps a zero gradient finite).
torch::Tensor
clip_factors(const torch::Tensor& norms, double max_grad_norm)
{
  return (max_grad_norm / (norms + 1e-6)).clamp_max(1.0);
}

torch::Tensor
summed_cross_entropy(const torch::Tensor& logits, const torch::Tensor& y)
{
  return F::cross_entropy(logits, y, F::CrossEntropyFuncOptions().reduction(torch::kSum));
}

// (Not ExpandingArray's std::vector constructor: some LibTorch 2.x releases lack it.)
torch::ExpandingArray<2>
pair(const std::vector<int64_t>& v)
{
  return torch::ExpandingArray<2>(at::IntArrayRef(v));
}

ClippedSum
empty_sum(const std::vector<torch::Tensor>& params)
{
  ClippedSum out;
  for (const auto& p : params) {
    out.grads.push_back(p.requires_grad() ? torch::zeros_like(p) : torch::Tensor());
  }
  out.norms = torch::zeros({0}, torch::kFloat64);
  return out;
}

} // namespace

torch::Tensor
poisson_sample(int64_t n, double q, at::Generator& gen)
{
  if (q >= 1) {
    return torch::arange(n, torch::kInt64);
  }
  std::vector<int64_t> picked;
  if (q > 0 && n > 0) {
    // Independent coin flips of probability q, drawn as the gaps between the heads: each gap
    // (the tails before the next head) is geometric, P(gap >= k) = (1 - q)^k, and
    // floor(ln v / ln(1 - q)) for v uniform in (0, 1] is exactly that. About q n + 1 uniforms
    // per batch rather than n.
    const double log_tail = std::log1p(-q);
    const auto chunk = static_cast<int64_t>(q * static_cast<double>(n) * 1.25) + 16;
    picked.reserve(static_cast<size_t>(chunk));
    int64_t pos = -1;
    for (bool more = true; more;) {
      const auto u = torch::rand({chunk}, gen, torch::TensorOptions().dtype(torch::kFloat64));
      const auto* v = u.data_ptr<double>();
      for (int64_t i = 0; i < chunk; ++i) {
        const double gap = std::floor(std::log1p(-v[i]) / log_tail); // u in [0, 1): 1 - u in (0, 1]
        if (gap >= static_cast<double>(n - 1 - pos)) {
          more = false;
          break;
        }
        pos += 1 + static_cast<int64_t>(gap);
        picked.push_back(pos);
      }
    }
  }
  return torch::tensor(picked, torch::kInt64);
}

bool
is_cpu_float_matrix(const torch::Tensor& t)
{
  return t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous();
}

// Adds each example's |a_i|^2 |g_i|^2 (+ |g_i|^2 with a bias) to sq[i], in double: a [B, in] and
// g [B, out] contiguous float on the CPU.
void
add_linear_norms(const torch::Tensor& a, const torch::Tensor& g, bool bias, std::vector<double>& sq)
{
  const auto batch = a.size(0);
  sq.resize(static_cast<size_t>(batch), 0.0);
  const auto in = a.size(1);
  const auto out = g.size(1);
  const float* pa = a.data_ptr<float>();
  const float* pg = g.data_ptr<float>();
  // Four sums in turn: independent chains the CPU can overlap (one chain waits out each add's
  // latency; without -ffast-math the compiler may not reorder them itself).
  const auto squares = [](const float* row, int64_t n) {
    std::array<double, 4> s{};
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
      for (int64_t j = 0; j < 4; ++j) {
        s[static_cast<size_t>(j)] += static_cast<double>(row[k + j]) * row[k + j];
      }
    }
    for (; k < n; ++k) {
      s[0] += static_cast<double>(row[k]) * row[k];
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
  };
  for (int64_t i = 0; i < batch; ++i) {
    const double g2 = squares(pg + i * out, out);
    sq[static_cast<size_t>(i)] += squares(pa + i * in, in) * g2 + (bias ? g2 : 0.0);
  }
}

// A Linear layer's clipped sum: each example's output gradient g_i scaled by its clip factor s_i
// in one pass (with the bias's sum, in double, when `bias_grad` is given), then
// weight_grad = (s g)^T a in one GEMM.
void
scale_linear(const torch::Tensor& g, const torch::Tensor& scale, torch::Tensor* bias_grad, const torch::Tensor& bias,
             const torch::Tensor& a, torch::Tensor& weight_grad)
{
  const auto batch = g.size(0);
  const auto out = g.size(1);
  auto gs = torch::empty_like(g);
  const float* pg = g.data_ptr<float>();
  const float* ps = scale.data_ptr<float>();
  float* po = gs.data_ptr<float>();
  std::vector<double> bsum(bias_grad != nullptr ? static_cast<size_t>(out) : 0, 0.0);
  for (int64_t i = 0; i < batch; ++i) {
    const float s = ps[i];
    for (int64_t k = 0; k < out; ++k) {
      po[i * out + k] = pg[i * out + k] * s;
    }
    if (bias_grad != nullptr) {
      for (int64_t k = 0; k < out; ++k) {
        bsum[static_cast<size_t>(k)] += po[i * out + k];
      }
    }
  }
  weight_grad = gs.t().mm(a);
  if (bias_grad != nullptr) {
    *bias_grad = torch::from_blob(bsum.data(), {out}, torch::kFloat64).to(torch::kFloat32).view(bias.sizes());
  }
}

std::optional<ClippedSum>
clipped_sum_vectorized(Model& model, const torch::Tensor& x, const torch::Tensor& y, double max_grad_norm)
{
  if (model.is_torchscript()) {
    return std::nullopt;
  }
  const auto params = model.parameters();
  const auto batch = x.size(0);
  if (batch == 0) {
    return empty_sum(params);
  }
  Tape tape;
  const auto logits = model.forward(x, &tape);

  // Every trained parameter must be exactly one tape entry's weight or bias.
  std::unordered_map<const void*, size_t> index; // TensorImpl -> position in params
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].requires_grad()) {
      index.emplace(params[i].unsafeGetTensorImpl(), i);
    }
  }
  struct Slot
  {
    size_t weight = 0;
    std::optional<size_t> bias;
  };
  std::vector<Slot> slots;
  size_t covered = 0;
  for (const auto& layer : tape.layers) {
    const auto w = index.find(layer.weight.unsafeGetTensorImpl());
    if (w == index.end() || layer.input.dim() != (layer.conv ? 4 : 2)) {
      return std::nullopt;
    }
    Slot slot{w->second, std::nullopt};
    if (layer.bias.defined()) {
      const auto b = index.find(layer.bias.unsafeGetTensorImpl());
      if (b == index.end()) {
        return std::nullopt;
      }
      slot.bias = b->second;
      ++covered;
    }
    ++covered;
    slots.push_back(slot);
  }
  if (covered != index.size() || tape.layers.empty()) {
    return std::nullopt; // a trained parameter outside the tape, or one recorded twice
  }

  const auto loss = summed_cross_entropy(logits, y);
  std::vector<torch::Tensor> outputs;
  outputs.reserve(tape.layers.size());
  for (const auto& layer : tape.layers) {
    outputs.push_back(layer.output);
  }
  // Only the gradients with respect to the layer outputs: autograd skips the parameter
  // gradients, which the per-example sums below replace.
  const auto out_grads = torch::autograd::grad({loss}, outputs);

  torch::NoGradGuard no_grad;
  // Per layer: what the clipped sum needs once the clip factors are known.
  struct Pending
  {
    torch::Tensor a;  // Linear: [B, in]
    torch::Tensor g;  // Linear: [B, out]
    torch::Tensor gw; // Conv2d: per-example weight gradients [in, B, out * kh * kw]
    torch::Tensor gb; // Conv2d: per-example bias gradients [B, out]
  };
  std::vector<Pending> pending(tape.layers.size());
  torch::Tensor sq; // [B] squared per-example norms, summed over layers
  auto add = [&sq](const torch::Tensor& t) { sq = sq.defined() ? sq.add_(t) : t; };
  // The Linear layers' share on the CPU, in one pass over their rows rather than four LibTorch
  // operations per layer, whose dispatch costs as much as the arithmetic for small layers
  // (docs/PERFORMANCE.md: 7% off the mlp's DP-SGD time with scale_linear below).
  std::vector<double> linear_sq;
  for (size_t l = 0; l < tape.layers.size(); ++l) {
    const auto& layer = tape.layers[l];
    const auto& g = out_grads[l];
    auto& p = pending[l];
    if (!layer.conv) {
      // grad W_i = g_i a_i^T, so |grad W_i|^2 = |g_i|^2 |a_i|^2 without forming it; grad b_i = g_i.
      if (is_cpu_float_matrix(layer.input) && is_cpu_float_matrix(g)) {
        add_linear_norms(layer.input, g, layer.bias.defined(), linear_sq);
      } else {
        const auto g2 = g.square().sum(1);
        add(layer.input.square().sum(1) * g2);
        if (layer.bias.defined()) {
          add(g2);
        }
      }
      p.a = layer.input;
      p.g = g;
    } else {
      // Conv2d (stride S, padding P, dilation D, groups 1): for example i,
      //   grad W_i[o, c, u, v] = sum over h, w of g_i[o, h, w] a_i[c, h S + u D - P, w S + v D - P],
      // which is itself a convolution of the input, with the examples as groups and the output
      // gradients as kernels: conv2d(a^T [C, B, H, W], g [B*O, 1, H', W'], stride D, padding P,
      // dilation S, groups B) is [C, B*O, >= kh, >= kw]. The textbook form, grad W_i =
      // g_i unfold(a_i)^T by bmm, gives the same numbers but took twice as long on the zoo cnn
      // (LibTorch 1.13, OpenBLAS): unfold materialises kh*kw copies of the input and bmm runs
      // one small GEMM per example. grad b_i = g_i summed over positions.
      const auto in_ch = layer.input.size(1);
      auto gw = F::conv2d(layer.input.transpose(0, 1), g.reshape({batch * g.size(1), 1, g.size(2), g.size(3)}),
                          F::Conv2dFuncOptions()
                            .stride(pair(layer.dilation))
                            .padding(pair(layer.padding))
                            .dilation(pair(layer.stride))
                            .groups(batch));
      gw = gw.narrow(2, 0, layer.kernel[0]).narrow(3, 0, layer.kernel[1]);
      p.gw = gw.reshape({in_ch, batch, -1}); // [C, B, O*kh*kw]
      add(p.gw.square().sum(at::IntArrayRef{0, 2}));
      if (layer.bias.defined()) {
        p.gb = g.sum(at::IntArrayRef{2, 3}); // [B, O]
        add(p.gb.square().sum(1));
      }
    }
  }
  ClippedSum out;
  torch::Tensor scale;
  if (!sq.defined() && !linear_sq.empty()) {
    // Every layer's share came from the fused pass: the norms and clip factors from it too.
    out.norms = torch::empty({batch}, torch::kFloat64);
    scale = torch::empty({batch}, torch::kFloat32);
    auto* n = out.norms.data_ptr<double>();
    auto* f = scale.data_ptr<float>();
    for (int64_t i = 0; i < batch; ++i) {
      n[i] = std::sqrt(linear_sq[static_cast<size_t>(i)]);
      f[i] = static_cast<float>(std::min(1.0, max_grad_norm / (n[i] + 1e-6)));
    }
  } else {
    if (!linear_sq.empty()) {
      add(torch::from_blob(linear_sq.data(), {batch}, torch::kFloat64).to(torch::kFloat32));
    }
    const auto norms = sq.sqrt();
    scale = clip_factors(norms, max_grad_norm).contiguous();
    out.norms = norms.to(torch::kCPU, torch::kFloat64);
  }
  out.grads.resize(params.size());
  for (size_t l = 0; l < tape.layers.size(); ++l) {
    const auto& layer = tape.layers[l];
    const auto& p = pending[l];
    const auto& slot = slots[l];
    if (!layer.conv) {
      if (is_cpu_float_matrix(p.g) && scale.is_cpu() && scale.scalar_type() == torch::kFloat32) {
        scale_linear(p.g, scale, slot.bias ? &out.grads[*slot.bias] : nullptr, layer.bias, p.a, out.grads[slot.weight]);
        continue;
      }
      const auto gs = p.g * scale.unsqueeze(1);
      out.grads[slot.weight] = gs.t().mm(p.a);
      if (slot.bias) {
        out.grads[*slot.bias] = gs.sum(0);
      }
    } else {
      // sum_i s_i grad W_i: [C, 1, O*kh*kw], then the weight's [O, C, kh, kw] layout.
      const auto in_ch = p.gw.size(0);
      const auto w = at::bmm(scale.view({1, 1, batch}).expand({in_ch, 1, batch}), p.gw);
      out.grads[slot.weight] =
        w.view({in_ch, layer.weight.size(0), layer.weight.size(2), layer.weight.size(3)}).transpose(0, 1).contiguous();
      if (slot.bias) {
        out.grads[*slot.bias] = scale.unsqueeze(0).mm(p.gb).view(layer.bias.sizes());
      }
    }
  }
  out.loss_sum = loss.item<double>();
  return out;
}

ClippedSum
clipped_sum_per_example(Model& model, const torch::Tensor& x, const torch::Tensor& y, double max_grad_norm)
{
  const auto params = model.parameters();
  auto out = empty_sum(params);
  std::vector<torch::Tensor> trained;
  std::vector<size_t> where;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].requires_grad()) {
      trained.push_back(params[i]);
      where.push_back(i);
    }
  }
  const auto batch = x.size(0);
  out.norms = torch::zeros({batch}, torch::kFloat64);
  auto* norms = out.norms.data_ptr<double>();
  for (int64_t i = 0; i < batch; ++i) {
    const auto loss = summed_cross_entropy(model.forward(x.narrow(0, i, 1)), y.narrow(0, i, 1));
    const auto grads = torch::autograd::grad({loss}, trained, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                             /*allow_unused=*/true);
    torch::NoGradGuard no_grad;
    double sq = 0;
    for (const auto& g : grads) {
      if (g.defined()) {
        sq += g.to(torch::kFloat64).square().sum().item<double>();
      }
    }
    norms[i] = std::sqrt(sq);
    const double scale = std::min(1.0, max_grad_norm / (norms[i] + 1e-6));
    for (size_t k = 0; k < grads.size(); ++k) {
      if (grads[k].defined()) {
        out.grads[where[k]].add_(grads[k], scale);
      }
    }
    out.loss_sum += loss.item<double>();
  }
  return out;
}

ClippedSum
clipped_sum(Model& model, const torch::Tensor& x, const torch::Tensor& y, double max_grad_norm)
{
  if (auto fast = clipped_sum_vectorized(model, x, y, max_grad_norm)) {
    return std::move(*fast);
  }
  return clipped_sum_per_example(model, x, y, max_grad_norm);
}

torch::Tensor
gaussian(GaussianNoise& noise, int64_t n, double stddev)
{
  auto out = torch::empty({n}, torch::kFloat64);
  noise.fill(std::span(out.data_ptr<double>(), static_cast<size_t>(n)), stddev);
  return out;
}

namespace {

// Runs work(part) for each part in [0, parts): part 0 on this thread, the others on LibTorch's
// inter-op pool, and returns when all have, rethrowing the first failure. Not at::parallel_for:
// its parallel path is inline in ATen's headers behind _OPENMP, so in code built without OpenMP
// (this backend: linking a second OpenMP runtime beside an upstream LibTorch's bundled one would
// give two thread pools) it runs everything on the calling thread.
template<class Work>
void
run_parts(size_t parts, const Work& work)
{
  std::vector<std::exception_ptr> failed(parts);
  std::latch done(static_cast<std::ptrdiff_t>(parts));
  auto one = [&](size_t part) {
    try {
      work(part);
    } catch (...) {
      failed[part] = std::current_exception();
    }
    done.count_down();
  };
  for (size_t part = 1; part < parts; ++part) {
    try {
      at::launch([&one, part] { one(part); });
    } catch (...) {
      one(part); // no task for the pool (out of memory or threads): this thread does it
    }
  }
  one(0);
  done.wait(); // the tasks refer to this frame: never leave before they end
  for (const auto& e : failed) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

} // namespace

double
private_gradient(Model& model, const torch::Tensor& x, const torch::Tensor& y, const Settings& settings,
                 GaussianNoise& noise)
{
  auto sum = clipped_sum(model, x, y, settings.max_grad_norm);
  const auto params = model.parameters();
  const double stddev = settings.noise_multiplier * settings.max_grad_norm;
  torch::NoGradGuard no_grad;
  // Each gradient: (clipped sum + noise) / expected batch, the noisy sum in double and snapped to
  // the noise's grid before anything else touches it (core/math/noise.hpp: no low-order bit of it
  // depends on the sum's own). A new tensor, never a view of the sums: Optimizer::zero_grad()
  // detaches grads in place, which LibTorch refuses for views.
  //
  // On the CPU in float: one pass over pieces of at most k_noise_piece values, each piece with its
  // own child generator (so a fixed seed draws the same noise on any number of threads), the
  // pieces shared among LibTorch's threads. Elsewhere: LibTorch's operations on drawn noise.
  constexpr int64_t k_noise_piece = 16384;
  struct Piece
  {
    const float* in;
    float* out;
    int64_t count;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  std::vector<torch::Tensor> grads(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& g = sum.grads[i];
    if (!g.defined()) {
      continue;
    }
    if (!(stddev > 0)) {
      grads[i] = g / settings.expected_batch;
    } else if (g.device().is_cpu() && g.scalar_type() == torch::kFloat32 && g.is_contiguous()) {
      grads[i] = torch::empty_like(g);
      for (int64_t begin = 0; begin < g.numel(); begin += k_noise_piece) {
        const auto count = std::min(k_noise_piece, g.numel() - begin);
        pieces.push_back({g.data_ptr<float>() + begin, grads[i].data_ptr<float>() + begin, count});
        total += count;
      }
    } else {
      const double grid = core::noise_grid(stddev);
      auto noisy = g.to(torch::kFloat64) + gaussian(noise, g.numel(), stddev).view(g.sizes()).to(g.device());
      noisy.div_(grid).round_().mul_(grid).div_(settings.expected_batch);
      grads[i] = noisy.to(g.scalar_type());
    }
  }
  if (!pieces.empty()) {
    std::vector<GaussianNoise> children;
    children.reserve(pieces.size());
    for (size_t k = 0; k < pieces.size(); ++k) {
      children.push_back(noise.child());
    }
    // Consecutive runs of pieces with about equal numbers of values, one per thread: part p
    // starts at the first piece whose middle lies past p/parts of the values.
    const auto parts = std::min(pieces.size(), static_cast<size_t>(std::max(1, at::get_num_threads())));
    std::vector<size_t> first(parts + 1, pieces.size());
    int64_t seen = 0;
    for (size_t k = 0, part = 0; k < pieces.size(); seen += pieces[k++].count) {
      const auto middle = 2 * seen + pieces[k].count;
      while (part < parts && middle * static_cast<int64_t>(parts) > 2 * total * static_cast<int64_t>(part)) {
        first[part++] = k;
      }
    }
    run_parts(parts, [&](size_t part) {
      for (size_t k = first[part]; k < first[part + 1]; ++k) {
        const auto n = static_cast<size_t>(pieces[k].count);
        children[k].add_snapped(std::span(pieces[k].in, n), std::span(pieces[k].out, n), stddev,
                                1 / settings.expected_batch);
      }
    });
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (grads[i].defined()) {
      params[i].mutable_grad() = grads[i];
    }
  }
  return sum.loss_sum;
}

} // namespace fedl::backends::torch_backend::dp
