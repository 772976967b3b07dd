// SPDX-License-Identifier: Apache-2.0
#include "core/format/tensor.hpp"

#include "core/util/error.hpp"

#include <cstring>

namespace fedl::core {

namespace {

template<typename T>
void
subtract(const TensorView& a, const TensorView& b, std::vector<std::byte>& out)
{
  const auto n = a.data.size() / sizeof(T);
  out.resize(a.data.size());
  // memcpy in and out: the views may be unaligned (a mapped safetensors file aligns only to the header).
  std::vector<T> x(n);
  std::vector<T> y(n);
  std::memcpy(x.data(), a.data.data(), a.data.size());
  std::memcpy(y.data(), b.data.data(), b.data.size());
  for (std::size_t i = 0; i < n; ++i) {
    x[i] -= y[i];
  }
  std::memcpy(out.data(), x.data(), out.size());
}

} // namespace

std::vector<OwnedTensor>
copy_tensors(std::span<const TensorView> tensors)
{
  std::vector<OwnedTensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    out.push_back({t.name, t.dtype, t.shape, {t.data.begin(), t.data.end()}});
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
weight_delta(std::span<const TensorView> after, std::span<const TensorView> before)
{
  if (after.size() != before.size()) {
    throw VerifyError("the trained model has {} tensors, the base model {}", after.size(), before.size());
  }
  std::vector<OwnedTensor> out;
  out.reserve(after.size());
  for (const auto& a : after) {
    const TensorView* b = nullptr;
    for (const auto& cand : before) {
      if (cand.name == a.name) {
        b = &cand;
      }
    }
    if (b == nullptr || b->dtype != a.dtype || b->shape != a.shape) {
      throw VerifyError("tensor {} differs in name, dtype or shape between the trained and the base model", a.name);
    }
    OwnedTensor d{a.name, a.dtype, a.shape, {}};
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
