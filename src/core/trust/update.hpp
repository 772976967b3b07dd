// SPDX-License-Identifier: Apache-2.0
// A site's signature on an update: what it covers, and how a site makes it.
#pragma once

#include "core/format/safetensors.hpp"
#include "core/format/tensor.hpp"
#include "core/trust/pki.hpp"

#include <span>
#include <string>

namespace fedl::core {

// The bytes a site's signature on an update covers (fedl train --identity): the metadata without
// fedl.signature, and each tensor's name, dtype, shape and data SHA-256, as compact JSON with
// sorted keys. It depends on the content only, not on the file's layout.
std::string update_signed_payload(std::span<const TensorView> tensors, const Metadata& metadata);

// Signs an update as site `identity` (its certificate CN is the site): sets fedl.site,
// fedl.cert_sha256, fedl.certificate and fedl.signature over update_signed_payload (any earlier
// signature is replaced). Used by fedl train --identity and by fedl join; fedl aggregate and
// fedl serve check it. Returns the site's name.
std::string sign_update(std::span<const TensorView> tensors, Metadata& metadata, const Identity& identity);

} // namespace fedl::core
