// SPDX-License-Identifier: Apache-2.0
// Owned tensors and the difference of two sets of weights (an update = trained - base).
#pragma once

#include "core/format/safetensors.hpp"

#include <cstddef>
#include <span>
#include <vector>

namespace fedl::core {

struct OwnedTensor
{
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  TensorView view() const { return {name, dtype, shape, bytes}; }
};

// Owned copies of `tensors`. `spare`: tensors of an earlier call whose buffers are reused, in
// order (a process that makes one every round then touches no fresh pages for them).
std::vector<OwnedTensor> copy_tensors(std::span<const TensorView> tensors, std::vector<OwnedTensor> spare = {});
std::vector<TensorView> views_of(std::span<const OwnedTensor> tensors);

// `after - before`, tensor by tensor (F32 or F64), reusing the buffers of `spare` as copy_tensors
// does. Throws VerifyError if the two do not have the same names, dtypes and shapes.
std::vector<OwnedTensor> weight_delta(std::span<const TensorView> after, std::span<const TensorView> before,
                                      std::vector<OwnedTensor> spare = {});

} // namespace fedl::core
