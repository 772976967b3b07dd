// SPDX-License-Identifier: Apache-2.0
#include "core/trust/update.hpp"

#include "core/util/error.hpp"

#include <nlohmann/json.hpp>

namespace fedl::core {

std::string
update_signed_payload(std::span<const TensorView> tensors, const Metadata& metadata)
{
  nlohmann::json meta(metadata);
  meta.erase("fedl.signature");
  nlohmann::json list = nlohmann::json::object();
  for (const auto& t : tensors) {
    list[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"sha256", sha256_hex(t.data)}};
  }
  return nlohmann::json{{"fedl", "update-signature-v1"}, {"metadata", meta}, {"tensors", list}}.dump();
}

std::string
sign_update(std::span<const TensorView> tensors, Metadata& metadata, const Identity& identity)
{
  const auto info = certificate_info(identity.cert);
  metadata.erase("fedl.signature");
  metadata["fedl.site"] = info.common_name;
  metadata["fedl.cert_sha256"] = info.fingerprint;
  metadata["fedl.certificate"] = to_pem(identity.cert);
  metadata["fedl.signature"] = sign(identity.key, as_bytes(update_signed_payload(tensors, metadata)));
  return info.common_name;
}

} // namespace fedl::core
