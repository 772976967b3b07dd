// SPDX-License-Identifier: Apache-2.0
// What the three data-set targets (csv, idx, npy) check about a data set that load_dataset
// accepted: one label per sample, the features of every sample, all finite, labels that are
// class indices, no more samples than the limit.
#pragma once

#include "fuzz.hpp"

#include "core/format/dataset.hpp"

#include <cmath>

namespace fedl::fuzz {

// The limit (--limit-samples) that option byte `b` asks for: bit 3 set, 1 + the high nibble.
inline std::optional<std::size_t>
limit_from(std::uint8_t b)
{
  if ((b & 0x08) == 0) {
    return std::nullopt;
  }
  return std::size_t{1} + (b >> 4);
}

inline void
check_dataset(const core::Dataset& ds, const core::DataOptions& opt)
{
  FEDL_FUZZ_CHECK(ds.size() >= 1);
  FEDL_FUZZ_CHECK(!opt.limit || ds.size() <= *opt.limit);
  FEDL_FUZZ_CHECK(!ds.sample_shape.empty());
  for (const auto d : ds.sample_shape) {
    FEDL_FUZZ_CHECK(d >= 1);
  }
  FEDL_FUZZ_CHECK(ds.sample_numel() >= 1);
  FEDL_FUZZ_CHECK(ds.features.size() == ds.size() * ds.sample_numel());
  for (const float f : ds.features) {
    FEDL_FUZZ_CHECK(std::isfinite(f));
  }
  for (const auto l : ds.labels) {
    FEDL_FUZZ_CHECK(l >= 0 && l < ds.num_classes());
  }
  FEDL_FUZZ_CHECK(ds.lines.empty() || ds.lines.size() == ds.size());
  (void)ds.where(ds.size() - 1);
  (void)ds.shape_string();
}

} // namespace fedl::fuzz
