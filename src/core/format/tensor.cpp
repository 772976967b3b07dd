// SPDX-License-Identifier: Apache-2.0
#include "core/format/tensor.hpp"

#include "core/util/error.hpp"

#include <cstring>

namespace fedl::core {

namespace {

// out = a − b, element by element in T. memcpy in and out: the views may be unaligned (a mapped
// safetensors file aligns only to the header); GCC turns them into plain vector loads and stores.
template<typename T>
void
subtract(const TensorView& a, const TensorView& b, std::vector<std::byte>& out)
{
  const auto n = a.data.size() / sizeof(T);
  out.resize(a.data.size());
  const std::byte* pa = a.data.data();
  const std::byte* pb = b.data.data();
  std::byte* po = out.data();
  for (std::size_t i = 0; i < n; ++i) {
    T x;
    T y;
    std::memcpy(&x, pa + i * sizeof(T), sizeof(T));
    std::memcpy(&y, pb + i * sizeof(T), sizeof(T));
    x -= y;
    std::memcpy(po + i * sizeof(T), &x, sizeof(T));
  }
}

// The buffer of `spare` at index i if there is one, for a tensor of the same size to reuse
// (its pages already belong to this process: no fresh page faults round after round).
std::vector<std::byte>
take_buffer(std::vector<OwnedTensor>& spare, std::size_t i)
{
  return i < spare.size() ? std::move(spare[i].bytes) : std::vector<std::byte>{};
}

} // namespace

std::vector<OwnedTensor>
copy_tensors(std::span<const TensorView> tensors, std::vector<OwnedTensor> spare)
{
  std::vector<OwnedTensor> out;
  out.reserve(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    auto bytes = take_buffer(spare, i);
    bytes.assign(t.data.begin(), t.data.end());
    out.push_back({t.name, t.dtype, t.shape, std::move(bytes)});
  }
  return out;
}

std::vector<TensorView>
views_of(std::span<const OwnedTensor> tensors)
{
  std::vector<TensorView> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    out.push_back(t.view());
  }
  return out;
}

std::vector<OwnedTensor>
weight_delta(std::span<const TensorView> after, std::span<const TensorView> before, std::vector<OwnedTensor> spare)
{
  if (after.size() != before.size()) {
    throw VerifyError("the trained model has {} tensors, the base model {}", after.size(), before.size());
  }
  std::vector<OwnedTensor> out;
  out.reserve(after.size());
  for (std::size_t i = 0; i < after.size(); ++i) {
    const auto& a = after[i];
    const TensorView* b = nullptr;
    for (const auto& cand : before) {
      if (cand.name == a.name) {
        b = &cand;
      }
    }
    if (b == nullptr || b->dtype != a.dtype || b->shape != a.shape) {
      throw VerifyError("tensor {} differs in name, dtype or shape between the trained and the base model", a.name);
    }
    OwnedTensor d{a.name, a.dtype, a.shape, take_buffer(spare, i)};
    if (a.dtype == DType::f64) {
      subtract<double>(a, *b, d.bytes);
    } else if (a.dtype == DType::f32) {
      subtract<float>(a, *b, d.bytes);
    } else {
      throw VerifyError("tensor {}: updates are defined for F32 and F64 weights only", a.name);
    }
    out.push_back(std::move(d));
  }
  return out;
}

} // namespace fedl::core
