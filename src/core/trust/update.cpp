// SPDX-License-Identifier: Apache-2.0
#include "core/trust/update.hpp"

#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>

namespace fedl::core {

namespace {

constexpr const char* v2_name = "update-signature-v2";
constexpr const char* version_key = "fedl.signature_version";
// The most header text a digester keeps, per update being received: an update's header holds its
// metadata (a certificate of ~1 KB) and ~100 bytes per tensor, so this fits some 2000 tensors. A
// larger header costs only speed (the file is hashed at the commit instead), never more memory
// than this for each site that uploads.
constexpr std::uint64_t max_kept_header = std::uint64_t{256} << 10;

// A header's metadata without the signature, as both versions cover it.
nlohmann::json
covered_metadata(const Metadata& metadata)
{
  nlohmann::json meta(metadata);
  meta.erase("fedl.signature");
  return meta;
}

// u64le(len(head)) || head: what the v2 digest starts with.
void
hash_head(Sha256& h, const std::string& head)
{
  std::array<std::byte, 8> size{};
  put_le(size.data(), head.size(), size.size());
  h.update(size);
  h.update(as_bytes(head));
}

} // namespace

std::optional<int>
update_signature_version(const Metadata& metadata) noexcept
{
  const auto it = metadata.find(version_key);
  if (it == metadata.end()) {
    return 1;
  }
  if (it->second == "2") {
    return 2;
  }
  return std::nullopt;
}

std::string
update_signed_payload(std::span<const TensorView> tensors, const Metadata& metadata)
{
  nlohmann::json list = nlohmann::json::object();
  for (const auto& t : tensors) {
    list[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"sha256", sha256_hex(t.data)}};
  }
  return nlohmann::json{{"fedl", "update-signature-v1"}, {"metadata", covered_metadata(metadata)}, {"tensors", list}}
    .dump();
}

std::string
update_head_v2(std::span<const TensorView* const> in_file_order, const Metadata& metadata)
{
  nlohmann::json list = nlohmann::json::object();
  std::uint64_t pos = 0;
  for (const auto* t : in_file_order) {
    list[t->name] = {
      {"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {pos, pos + t->data.size()}}};
    pos += t->data.size();
  }
  return nlohmann::json{{"fedl", v2_name}, {"metadata", covered_metadata(metadata)}, {"tensors", list}}.dump();
}

std::string
update_signed_message_v2(const std::string& digest)
{
  return nlohmann::json{{"fedl", v2_name}, {"sha256", digest}}.dump();
}

namespace {

// A parsed file's tensors in file order (parse_safetensors gives them so, packed: check_tiling).
std::vector<const TensorView*>
file_order(const Safetensors& st)
{
  std::vector<const TensorView*> order;
  order.reserve(st.tensors.size());
  for (const auto& t : st.tensors) {
    order.push_back(&t);
  }
  return order;
}

// D for tensors laid out in `order`, packed: their data is the data section.
std::string
digest_v2(std::span<const TensorView* const> order, const Metadata& metadata)
{
  Sha256 h;
  hash_head(h, update_head_v2(order, metadata));
  for (const auto* t : order) {
    h.update(t->data);
  }
  return h.hex();
}

} // namespace

std::string
update_head_v2(const Safetensors& st)
{
  return update_head_v2(file_order(st), st.metadata);
}

std::string
update_digest_v2(const Safetensors& st)
{
  return digest_v2(file_order(st), st.metadata);
}

void
UpdateDigester::update(std::span<const std::byte> bytes)
{
  while (!bytes.empty()) {
    switch (m_stage) {
    case Stage::data:
      (m_v2 ? *m_v2 : m_file).update(bytes);
      return;
    case Stage::size:
    case Stage::header: {
      const std::size_t want = m_stage == Stage::size ? 8 : 8 + m_header_size;
      const auto take = std::min<std::uint64_t>(bytes.size(), want - m_prefix.size());
      m_prefix.append(reinterpret_cast<const char*>(bytes.data()), take);
      m_file.update(bytes.first(take));
      bytes = bytes.subspan(take);
      if (m_prefix.size() < want) {
        return;
      }
      if (m_stage == Stage::size) {
        m_header_size = get_le(reinterpret_cast<const std::byte*>(m_prefix.data()), 8);
        // A header larger than any update's is not kept: the file hash goes on, and the file's
        // own parse says what is wrong with it.
        m_stage = m_header_size <= max_kept_header ? Stage::header : Stage::data;
      } else {
        header_done();
      }
      break;
    }
    }
  }
}

namespace {

// The head H of a v2 update from its header text; 0 in `version` for a fedl.signature_version
// this build does not know. Nothing for a header that is not a v2 update's or does not parse.
std::optional<std::string>
v2_head(std::string_view text, int& version)
{
  if (json_nesting(text) > safetensors_max_nesting) {
    return std::nullopt;
  }
  const auto header = nlohmann::json::parse(text, nullptr, false);
  if (!header.is_object()) {
    return std::nullopt;
  }
  const auto meta = header.find("__metadata__");
  if (meta == header.end() || !meta->is_object() || !meta->contains(version_key)) {
    return std::nullopt;
  }
  if ((*meta)[version_key] != "2") {
    version = 0;
    return std::nullopt;
  }
  nlohmann::json covered = *meta;
  covered.erase("fedl.signature");
  nlohmann::json list = nlohmann::json::object();
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets")) {
      return std::nullopt;
    }
    list[name] = {{"dtype", entry["dtype"]}, {"shape", entry["shape"]}, {"data_offsets", entry["data_offsets"]}};
  }
  return nlohmann::json{{"fedl", v2_name}, {"metadata", std::move(covered)}, {"tensors", std::move(list)}}.dump();
}

} // namespace

// The header is complete: for a v2 update its head H starts the v2 hash; anything else goes on
// with the file's hash.
void
UpdateDigester::header_done()
{
  m_stage = Stage::data;
  auto head = v2_head(std::string_view(m_prefix).substr(8), m_result.version);
  m_prefix.clear();
  m_prefix.shrink_to_fit();
  if (head) {
    m_result.version = 2;
    m_result.head = std::move(*head);
    m_v2.emplace();
    hash_head(*m_v2, m_result.head);
  }
}

UpdateDigest
UpdateDigester::finish()
{
  if (m_stage != Stage::data) {
    m_result.version = 1; // too short for its header: the file's hash, which its parse refuses
  }
  m_result.hex = m_v2 ? m_v2->hex() : m_file.hex();
  return std::move(m_result);
}

std::string
sign_update(std::span<const TensorView> tensors, Metadata& metadata, const Identity& identity, int version)
{
  const auto info = certificate_info(identity.cert);
  metadata.erase("fedl.signature");
  metadata["fedl.site"] = info.common_name;
  metadata["fedl.cert_sha256"] = info.fingerprint;
  metadata["fedl.certificate"] = to_pem(identity.cert);
  std::string message;
  if (version >= 2) {
    metadata.insert_or_assign(version_key, std::string(1, '2'));
    message = update_signed_message_v2(digest_v2(serialize_order(tensors), metadata));
  } else {
    metadata.erase(version_key);
    message = update_signed_payload(tensors, metadata);
  }
  metadata["fedl.signature"] = sign(identity.key, as_bytes(message));
  return info.common_name;
}

} // namespace fedl::core
