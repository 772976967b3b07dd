// SPDX-License-Identifier: Apache-2.0
// Update validation: whether an update is fit to aggregate with a base model (its metadata, its
// tensors' names, dtypes and shapes, and no NaN or infinite value), and its sample count.
#include "core/math/aggregate.hpp"

#include "core/math/aggregate_detail.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <utility>

namespace fedl::core {

using namespace aggregate_detail;

std::optional<std::uint64_t>
update_num_samples(const Safetensors& update)
{
  const auto text = update.meta("fedl.num_samples");
  if (!text || text->empty() || !std::all_of(text->begin(), text->end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  const auto n = parse_unsigned<std::uint64_t>(*text);
  if (!n || *n == 0 || *n > (std::uint64_t{1} << 53)) {
    return std::nullopt;
  }
  return n;
}

namespace {

// How many of the n values at p have all exponent bits set (NaN or infinite).
template<typename Bits, Bits ExponentMask>
FEDL_CLONES std::size_t
count_exponent_all_ones(const std::byte* p, std::size_t n) noexcept
{
  std::array<Bits, k_lanes> acc{};
  std::size_t j = 0;
  for (; j + k_lanes <= n; j += k_lanes) {
    for (std::size_t k = 0; k < k_lanes; ++k) {
      acc[k] += (load<Bits>(p + (j + k) * sizeof(Bits)) & ExponentMask) == ExponentMask ? 1 : 0;
    }
  }
  std::size_t count = 0;
  for (; j < n; ++j) {
    count += (load<Bits>(p + j * sizeof(Bits)) & ExponentMask) == ExponentMask ? 1 : 0;
  }
  for (const auto c : acc) {
    count += static_cast<std::size_t>(c);
  }
  return count;
}

// How many values of a tensor are NaN or infinite, and the index of the first. Reads the tensor
// in chunks of 1 MiB; `rel` may drop each chunk's pages once read.
template<typename T, typename Bits, Bits ExponentMask>
std::pair<std::size_t, std::size_t>
count_non_finite(const TensorView& t, PageReleaser& rel) noexcept
{
  constexpr std::size_t chunk = (std::size_t{1} << 20) / sizeof(T);
  const std::size_t n = t.numel();
  const std::byte* p = t.data.data();
  std::size_t count = 0;
  std::size_t first = n;
  for (std::size_t b = 0; b < n; b += chunk) {
    const std::size_t len = std::min(chunk, n - b);
    const std::byte* q = p + b * sizeof(T);
    const std::size_t c = count_exponent_all_ones<Bits, ExponentMask>(q, len);
    if (c > 0 && count == 0) {
      for (std::size_t j = 0; j < len; ++j) {
        if (!std::isfinite(load<T>(q + j * sizeof(T)))) {
          first = b + j;
          break;
        }
      }
    }
    count += c;
    rel.consumed(0, q, len * sizeof(T));
  }
  return {count, first};
}

std::optional<std::string>
values_impl(const Safetensors& update, bool release)
{
  PageReleaser rel(release, 1, std::size_t{1} << 20);
  for (const auto& ut : update.tensors) {
    if (!is_float(ut.dtype)) {
      continue;
    }
    const auto [count, first] = ut.dtype == DType::f32
                                  ? count_non_finite<float, std::uint32_t, 0x7f800000U>(ut, rel)
                                  : count_non_finite<double, std::uint64_t, 0x7ff0000000000000ULL>(ut, rel);
    if (count > 0) {
      const bool nan = ut.dtype == DType::f32 ? std::isnan(load<float>(ut.data.data() + first * 4))
                                              : std::isnan(load<double>(ut.data.data() + first * 8));
      return fmt::format("tensor {} has {} non-finite value{} (the first, at flat index {}, is {})", ut.name, count,
                         count == 1 ? "" : "s", first, nan ? "NaN" : "infinite");
    }
  }
  return std::nullopt;
}

} // namespace

std::optional<std::string>
validate_update_form(const Safetensors& base, std::string_view base_sha256, const Safetensors& update)
{
  try {
    const auto kind = update.meta("fedl.kind");
    if (!kind) {
      return std::string("it has no fedl.kind metadata: it is not a fedl update");
    }
    if (*kind != "update") {
      return fmt::format("fedl.kind is {}, not 'update'", quote_text(*kind));
    }
    const auto hash = update.meta("fedl.base_sha256");
    if (!hash) {
      return std::string("it has no fedl.base_sha256 metadata, so its base model is unknown");
    }
    if (*hash != base_sha256) {
      return fmt::format("fedl.base_sha256 is {}, but the base model's SHA-256 is {}: it was trained from "
                         "another model",
                         quote_text(*hash, 80), base_sha256);
    }
    const auto samples = update.meta("fedl.num_samples");
    if (!samples) {
      return std::string("it has no fedl.num_samples metadata");
    }
    if (!update_num_samples(update)) {
      return fmt::format("fedl.num_samples is {}, not a positive integer", quote_text(*samples));
    }
    for (const auto& bt : base.tensors) {
      const auto* ut = update.find(bt.name);
      if (ut == nullptr) {
        return fmt::format("tensor {} of the base model is missing", bt.name);
      }
      if (ut->dtype != bt.dtype) {
        return fmt::format("tensor {} is {}, but the base model's is {}", bt.name, dtype_name(ut->dtype),
                           dtype_name(bt.dtype));
      }
      if (ut->shape != bt.shape) {
        return fmt::format("tensor {} has shape {}, but the base model's has {}", bt.name, shape_text(ut->shape),
                           shape_text(bt.shape));
      }
      if (!is_float(ut->dtype)) {
        return fmt::format("tensor {} is {}: updates are defined for F32 and F64 tensors only", bt.name,
                           dtype_name(ut->dtype));
      }
    }
    for (const auto& ut : update.tensors) {
      if (base.find(ut.name) == nullptr) {
        return fmt::format("tensor {} is not in the base model", ut.name);
      }
    }
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    return fmt::format("it cannot be checked: {}", e.what());
  }
  return std::nullopt;
}

std::optional<std::string>
validate_update_values(const SafetensorsFile& update)
{
  return values_impl(update.content(), true);
}

std::optional<std::string>
validate_update(const Safetensors& base, std::string_view base_sha256, const Safetensors& update)
{
  auto reason = validate_update_form(base, base_sha256, update);
  return reason ? reason : values_impl(update, false);
}

std::optional<std::string>
validate_update(const Safetensors& base, std::string_view base_sha256, const SafetensorsFile& update)
{
  auto reason = validate_update_form(base, base_sha256, update.content());
  return reason ? reason : values_impl(update.content(), true);
}

} // namespace fedl::core
