// SPDX-License-Identifier: Apache-2.0
#include "core/secagg/encoding.hpp"

#include "core/math/aggregate.hpp"
#include "core/math/noise.hpp"
#include "core/util/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string_view>

namespace fedl::core::secagg {

namespace {

// The largest power of two p with p · factor ≤ limit.
double
power_scale(double limit, double factor)
{
  return std::exp2(std::floor(std::log2(limit / factor)));
}

// Each value x (times `clip`, the L2 clip's factor), clipped to [−range, range] (NaN to 0), as
// round(x · factor) mod 2^32, rounded half to even. The rounding adds 1.5 · 2^52: for |y| < 2^51
// the sum's last 32 bits of mantissa are round(y) in two's complement (what nearbyint gives in
// the default rounding mode), without a call per value, so that the loop vectorizes.
template<typename T>
void
encode_values(const TensorView& t, double clip, double factor, double range, Encoded& out)
{
  const std::size_t n = t.data.size() / sizeof(T);
  const std::size_t at = out.words.size();
  out.words.resize(at + n);
  std::uint32_t* w = out.words.data() + at;
  const std::byte* src = t.data.data();
  std::size_t clipped = 0;
  for (std::size_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, src + i * sizeof(T), sizeof(T));
    double x = static_cast<double>(v) * clip;
    const bool inside = x >= -range && x <= range; // false for NaN
    clipped += inside ? 0 : 1;
    x = x != x ? 0.0 : x;
    x = x < -range ? -range : x;
    x = x > range ? range : x;
    const double shifted = x * factor + 0x1.8p52;
    std::uint64_t bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    w[i] = static_cast<std::uint32_t>(bits);
  }
  out.clipped += clipped;
}

template<typename T>
void
decode_values(std::span<const std::uint32_t> words, double scale, double total, OwnedTensor& t)
{
  t.bytes.resize(words.size() * sizeof(T));
  for (std::size_t i = 0; i < words.size(); ++i) {
    const auto sum = static_cast<std::int32_t>(words[i]);
    const auto v = static_cast<T>(static_cast<double>(sum) / scale / total);
    std::memcpy(t.bytes.data() + i * sizeof(T), &v, sizeof(T));
  }
}

} // namespace

void
Encoding::check() const
{
  if (!(range > 0) || !std::isfinite(range)) {
    throw UsageError("the secure-aggregation range must be a positive number, not {}", range);
  }
  if (max_samples == 0) {
    throw UsageError("the secure-aggregation sample cap must be at least 1");
  }
  if (sites == 0 || sites > (std::size_t{1} << 20)) {
    throw UsageError("secure aggregation of {} sites: 1 to 2^20", sites);
  }
  if (!(noise >= 0) || !std::isfinite(noise)) {
    throw UsageError("the secure-aggregation noise must be 0 or a positive number, not {}", noise);
  }
  if (span() > 0x1p23) {
    throw UsageError("a secure-aggregation range of {:g}{} over {} sites leaves fewer than 8 bits per value; lower it",
                     range, noise > 0 ? fmt::format(" with noise {:g}", noise) : std::string(), sites);
  }
}

double
Encoding::span() const
{
  const auto n = static_cast<double>(sites);
  return n * range + 10 * std::sqrt(n) * noise;
}

double
Encoding::scale() const
{
  return power_scale(0x1p31 - 1, span());
}

double
Encoding::sensitivity(double clip_norm, std::size_t values) const
{
  return clip_norm * scale() + std::sqrt(static_cast<double>(values)) / 2;
}

double
Encoding::weight_scale() const
{
  return power_scale(0x1p32 - 1, static_cast<double>(sites));
}

namespace {

// The tensors in the order their values are encoded: by name, so that the site (whose update
// lists them as its trainer wrote them) and the coordinator (who decodes into the base model's
// order) agree.
template<typename T>
std::vector<const T*>
by_name(std::span<const T> tensors)
{
  std::vector<const T*> out;
  for (const auto& t : tensors) {
    out.push_back(&t);
  }
  std::sort(out.begin(), out.end(), [](const T* a, const T* b) { return a->name < b->name; });
  return out;
}

} // namespace

Encoded
encode(std::span<const TensorView> update, std::uint64_t samples, const Encoding& e, std::optional<double> clip_norm)
{
  e.check();
  if (samples == 0) {
    throw UsageError("an update of 0 samples cannot be weighted");
  }
  const double w = static_cast<double>(std::min(samples, e.max_samples)) / static_cast<double>(e.max_samples);
  Encoded out;
  std::size_t total = 0;
  for (const auto& t : update) {
    if (t.dtype != DType::f32 && t.dtype != DType::f64) {
      throw UsageError("tensor {} is {}: secure aggregation sums F32 and F64 tensors only", t.name,
                       dtype_name(t.dtype));
    }
    total += t.numel();
  }
  double factor = 1;
  if (clip_norm) {
    const double norm = update_norm(Safetensors{{update.begin(), update.end()}, {}});
    factor = norm > *clip_norm ? *clip_norm / norm : 1.0;
  }
  out.words.reserve(total + 1);
  for (const auto* t : by_name(update)) {
    if (t->dtype == DType::f32) {
      encode_values<float>(*t, factor, w * e.scale(), e.range, out);
    } else {
      encode_values<double>(*t, factor, w * e.scale(), e.range, out);
    }
  }
  if (e.noise > 0) {
    DiscreteGaussianNoise(0).add_to(out.words, e.noise * e.scale());
  }
  out.words.push_back(static_cast<std::uint32_t>(std::nearbyint(w * e.weight_scale())));
  return out;
}

Decoded
decode(std::span<const std::uint32_t> sum, std::span<const TensorView> like, const Encoding& e,
       std::optional<double> divisor)
{
  e.check();
  std::size_t total = 0;
  for (const auto& t : like) {
    total += t.numel();
  }
  if (sum.size() != total + 1) {
    throw Error("a secure-aggregation sum of {} words for {} values and the weight", sum.size(), total);
  }
  Decoded out;
  out.total_weight = static_cast<double>(sum.back()) / e.weight_scale();
  if (!(out.total_weight > 0)) {
    throw Error("the secure-aggregation sum carries no weight");
  }
  const double by = divisor.value_or(out.total_weight);
  std::map<std::string_view, OwnedTensor> decoded;
  std::size_t at = 0;
  for (const auto* t : by_name(like)) {
    OwnedTensor o{t->name, t->dtype, t->shape, {}};
    const auto words = sum.subspan(at, t->numel());
    if (t->dtype == DType::f64) {
      decode_values<double>(words, e.scale(), by, o);
    } else {
      decode_values<float>(words, e.scale(), by, o);
    }
    at += t->numel();
    decoded.emplace(t->name, std::move(o));
  }
  for (const auto& t : like) {
    out.mean.push_back(std::move(decoded.at(t.name)));
  }
  return out;
}

} // namespace fedl::core::secagg
