// SPDX-License-Identifier: Apache-2.0
// Owned tensors and the difference of two sets of weights (an update = trained - base).
#pragma once

#include "core/pki.hpp"
#include "core/safetensors.hpp"

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

std::vector<OwnedTensor> copy_tensors(std::span<const TensorView> tensors);
std::vector<TensorView> views_of(std::span<const OwnedTensor> tensors);

// The bytes a site's signature on an update covers (fedl train --identity): the metadata without
// fedl.signature, and each tensor's name, dtype, shape and data SHA-256, as compact JSON with
// sorted keys. It depends on the content only, not on the file's layout.
std::string update_signed_payload(std::span<const TensorView> tensors, const Metadata& metadata);

// Signs an update as site `identity` (its certificate CN is the site): sets fedl.site,
// fedl.cert_sha256, fedl.certificate and fedl.signature over update_signed_payload (any earlier
// signature is replaced). Used by fedl train --identity and by fedl join; fedl aggregate and
// fedl serve check it. Returns the site's name.
std::string sign_update(std::span<const TensorView> tensors, Metadata& metadata, const Identity& identity);

// `after - before`, tensor by tensor (F32 or F64). Throws VerifyError if the two do not have the
// same names, dtypes and shapes.
std::vector<OwnedTensor> weight_delta(std::span<const TensorView> after, std::span<const TensorView> before);

} // namespace fedl::core
