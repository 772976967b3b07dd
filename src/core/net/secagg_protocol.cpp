// SPDX-License-Identifier: Apache-2.0
#include "core/net/secagg_protocol.hpp"

#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>

namespace fedl::core {

namespace {

using json = nlohmann::json;

constexpr std::size_t max_certificate_bytes = 16 * 1024;
constexpr std::size_t max_signature_bytes = 256;
constexpr std::size_t max_site_name_bytes = 256;
constexpr std::size_t max_dp_report_bytes = 4096;

// The array under `key` (absent: empty) of at most `max` elements; else a ProtocolError.
const json&
header_array(const json& h, const char* key, std::size_t max)
{
  static const json empty = json::array();
  const auto it = h.find(key);
  if (it == h.end() || it->is_null()) {
    return empty;
  }
  if (!it->is_array()) {
    throw ProtocolError(fmt::format("frame header field {} is not an array", key));
  }
  if (it->size() > max) {
    throw ProtocolError(fmt::format("frame header field {} has {} elements, more than {}", key, it->size(), max));
  }
  return *it;
}

// A string field of at most `max` bytes.
std::string
bounded_string(const json& h, const char* key, std::size_t max)
{
  auto s = header_string(h, key);
  if (s.size() > max) {
    throw ProtocolError(fmt::format("frame header field {} is longer than {} bytes", key, max));
  }
  return s;
}

// A site index: 1 to secagg_max_sites.
std::uint32_t
site_index(const json& h, const char* key)
{
  const auto v = header_uint(h, key);
  if (v == 0 || v > secagg_max_sites) {
    throw ProtocolError(fmt::format("frame header field {} is not a site index (1 to {})", key, secagg_max_sites));
  }
  return static_cast<std::uint32_t>(v);
}

// Exactly `size` bytes in hex.
std::vector<std::byte>
hex_field(const json& h, const char* key, std::size_t size)
{
  const auto text = bounded_string(h, key, 2 * size);
  auto bytes = hex_decode(text);
  if (!bytes || bytes->size() != size) {
    throw ProtocolError(fmt::format("frame header field {} is not {} bytes in hex", key, size));
  }
  return *bytes;
}

secagg::Bytes32
hex32(const json& h, const char* key)
{
  const auto v = hex_field(h, key, 32);
  secagg::Bytes32 out{};
  std::copy(v.begin(), v.end(), out.begin());
  return out;
}

json
advert_json(const secagg::KeyAdvert& a)
{
  return {{"index", a.index},
          {"c_public", hex_encode(a.c_public)},
          {"s_public", hex_encode(a.s_public)},
          {"seed_commitment", hex_encode(a.seed_commitment)},
          {"signature", a.signature}};
}

secagg::KeyAdvert
advert_from(const json& j)
{
  if (!j.is_object()) {
    throw ProtocolError("a key advert is not an object");
  }
  return {site_index(j, "index"), hex32(j, "c_public"), hex32(j, "s_public"), hex32(j, "seed_commitment"),
          bounded_string(j, "signature", max_signature_bytes)};
}

json
share_json(const secagg::RevealedShare& s)
{
  return {{"owner", s.owner}, {"x", s.share.x}, {"y", s.share.y}};
}

secagg::RevealedShare
share_from(const json& j)
{
  if (!j.is_object()) {
    throw ProtocolError("a revealed share is not an object");
  }
  secagg::RevealedShare s{site_index(j, "owner"), {site_index(j, "x"), {}}};
  const auto& y = header_array(j, "y", secagg::secret_limbs);
  if (y.size() != secagg::secret_limbs) {
    throw ProtocolError(fmt::format("a revealed share holds {} values, not {}", y.size(), secagg::secret_limbs));
  }
  for (const auto& v : y) {
    if (!v.is_number_unsigned() || v.get<std::uint64_t>() >= secagg::field_prime) {
      throw ProtocolError("a revealed share holds a value outside the field");
    }
    s.share.y.push_back(v.get<std::uint64_t>());
  }
  return s;
}

} // namespace

json
SecAggSetup::to_json() const
{
  json j = {{"sites", sites},           {"index", index},   {"threshold", threshold}, {"neighbours", neighbours},
            {"graph_seed", graph_seed}, {"length", length}, {"range", range},         {"max_samples", max_samples}};
  if (clip_norm) {
    j["clip_norm"] = *clip_norm;
  }
  if (noise > 0) {
    j["noise"] = noise;
  }
  return j;
}

SecAggSetup
SecAggSetup::from_json(const json& j)
{
  if (!j.is_object()) {
    throw ProtocolError("the secure_aggregation setup is not an object");
  }
  SecAggSetup s;
  for (const auto& name : header_array(j, "sites", secagg_max_sites)) {
    if (!name.is_string() || name.get_ref<const std::string&>().size() > max_site_name_bytes) {
      throw ProtocolError("a site in the secure_aggregation setup is not a name");
    }
    s.sites.push_back(name.get<std::string>());
  }
  s.index = site_index(j, "index");
  if (s.index > s.sites.size()) {
    throw ProtocolError(fmt::format("secure_aggregation index {} of {} sites", s.index, s.sites.size()));
  }
  s.threshold = header_uint(j, "threshold");
  s.neighbours = header_uint(j, "neighbours");
  s.graph_seed = header_uint(j, "graph_seed");
  s.length = header_uint(j, "length");
  s.range = header_number(j, "range", 0);
  s.max_samples = header_uint(j, "max_samples");
  if (j.contains("clip_norm")) {
    s.clip_norm = header_number(j, "clip_norm", 0);
    if (!(*s.clip_norm > 0) || !std::isfinite(*s.clip_norm)) {
      throw ProtocolError("the secure_aggregation clip_norm is not a positive number");
    }
  }
  s.noise = header_number(j, "noise", 0);
  return s;
}

secagg::Params
SecAggSetup::params(std::uint64_t round, std::uint64_t attempt) const
{
  secagg::Params p;
  p.round = round;
  p.attempt = attempt;
  p.sites = sites;
  p.threshold = threshold;
  p.neighbours = neighbours;
  p.graph_seed = graph_seed;
  p.length = length;
  p.check();
  return p;
}

secagg::Encoding
SecAggSetup::encoding() const
{
  const secagg::Encoding e{range, max_samples, sites.size(), noise};
  e.check();
  return e;
}

json
SecAggKeys::to_header() const
{
  auto h = advert_json(advert);
  h["task"] = task;
  return h;
}

SecAggKeys
SecAggKeys::from_header(const json& h)
{
  return {header_uint(h, "task"), advert_from(h)};
}

json
SecAggPeers::to_header() const
{
  json list = json::array();
  for (const auto& p : peers) {
    auto j = advert_json(p.advert);
    j["certificate"] = p.certificate;
    list.push_back(std::move(j));
  }
  return {{"task", task}, {"peers", std::move(list)}};
}

SecAggPeers
SecAggPeers::from_header(const json& h, std::size_t max_peers)
{
  SecAggPeers out{header_uint(h, "task"), {}};
  for (const auto& j : header_array(h, "peers", max_peers)) {
    auto advert = advert_from(j);
    out.peers.push_back({std::move(advert), bounded_string(j, "certificate", max_certificate_bytes)});
  }
  return out;
}

json
SecAggShares::to_header() const
{
  json list = json::array();
  for (const auto& s : shares) {
    list.push_back({{"from", s.from}, {"to", s.to}, {"sealed", hex_encode(s.sealed)}});
  }
  return {{"task", task}, {"shares", std::move(list)}};
}

SecAggShares
SecAggShares::from_header(const json& h, std::size_t max_shares)
{
  SecAggShares out{header_uint(h, "task"), {}};
  for (const auto& j : header_array(h, "shares", max_shares)) {
    if (!j.is_object()) {
      throw ProtocolError("a sealed share is not an object");
    }
    out.shares.push_back(
      {site_index(j, "from"), site_index(j, "to"), hex_field(j, "sealed", secagg::sealed_share_bytes)});
  }
  return out;
}

json
SecAggInput::to_header() const
{
  json h = {
    {"task", task}, {"clipped", clipped}, {"range", range}, {"max_samples", max_samples}, {"signature", signature}};
  if (complaint) {
    h["complaint"] = *complaint;
  }
  if (dp) {
    h["dp"] = *dp;
  }
  if (clip_norm) {
    h["clip_norm"] = *clip_norm;
  }
  if (sandbox) {
    h["sandbox"] = sandbox_level_name(*sandbox);
  }
  if (model_policy) {
    h["model_policy"] = model_policy_name(*model_policy);
  }
  return h;
}

SecAggInput
SecAggInput::from_header(const json& h)
{
  SecAggInput in;
  in.task = header_uint(h, "task");
  if (h.contains("complaint")) {
    in.complaint = site_index(h, "complaint");
  }
  in.clipped = header_uint(h, "clipped");
  in.range = header_number(h, "range", 0);
  in.max_samples = header_uint(h, "max_samples");
  if (h.contains("dp")) {
    in.dp = bounded_string(h, "dp", max_dp_report_bytes);
  }
  if (h.contains("clip_norm")) {
    in.clip_norm = header_number(h, "clip_norm", 0);
  }
  in.signature = bounded_string(h, "signature", max_signature_bytes);
  in.sandbox = header_sandbox(h, "sandbox");
  in.model_policy = header_model_policy(h, "model_policy");
  return in;
}

std::vector<std::byte>
secagg_input_payload(const secagg::Params& p, std::uint32_t index, const std::string& words_sha256,
                     const SecAggInput& input)
{
  // The header as sent, but its signature: a field the header carries is always signed.
  auto body = input.to_header();
  body.erase("signature");
  body.update(json{{"protocol", "fedl-secagg-v1 input"},
                   {"round", p.round},
                   {"attempt", p.attempt},
                   {"index", index},
                   {"site", index >= 1 && index <= p.sites.size() ? p.sites[index - 1] : std::string()},
                   {"words_sha256", words_sha256}});
  const auto text = body.dump();
  const auto bytes = as_bytes(text);
  return {bytes.begin(), bytes.end()};
}

json
SecAggUnmask::to_header() const
{
  json sigs = json::array();
  for (const auto& s : signatures) {
    sigs.push_back({{"index", s.index}, {"signature", s.signature}});
  }
  return {{"task", task}, {"survivors", survivors}, {"signatures", std::move(sigs)}};
}

SecAggUnmask
SecAggUnmask::from_header(const json& h, std::size_t max_sites)
{
  SecAggUnmask out{header_uint(h, "task"), {}, {}};
  for (const auto& v : header_array(h, "survivors", max_sites)) {
    if (!v.is_number_unsigned() || v.get<std::uint64_t>() == 0 || v.get<std::uint64_t>() > secagg_max_sites) {
      throw ProtocolError("a survivor is not a site index");
    }
    out.survivors.push_back(v.get<std::uint32_t>());
  }
  for (const auto& j : header_array(h, "signatures", max_sites)) {
    if (!j.is_object()) {
      throw ProtocolError("a survivor's signature is not an object");
    }
    out.signatures.push_back({site_index(j, "index"), bounded_string(j, "signature", max_signature_bytes)});
  }
  return out;
}

std::string
secagg_certificates_body(std::span<const std::pair<std::uint32_t, std::string>> certificates)
{
  json list = json::array();
  for (const auto& [index, pem] : certificates) {
    list.push_back({{"index", index}, {"certificate", pem}});
  }
  return json{{"certificates", std::move(list)}}.dump();
}

std::vector<std::pair<std::uint32_t, std::string>>
secagg_certificates_from_body(std::span<const std::byte> body, std::size_t max_sites)
{
  if (body.size() > max_sites * (max_certificate_bytes + 64) + 2) {
    throw ProtocolError(
      fmt::format("a body of certificates of {} bytes, more than {} sites' may take", body.size(), max_sites));
  }
  json top;
  try {
    top = decode_header(std::string_view(reinterpret_cast<const char*>(body.data()), body.size()));
  } catch (const ProtocolError& e) {
    throw ProtocolError(fmt::format("the certificates' body: {}", e.what()));
  }
  const auto& list = header_array(top, "certificates", max_sites);
  std::vector<std::pair<std::uint32_t, std::string>> out;
  std::set<std::uint32_t> seen;
  for (const auto& j : list) {
    if (!j.is_object()) {
      throw ProtocolError("a certificate entry is not an object");
    }
    const auto index = site_index(j, "index");
    if (!seen.insert(index).second) {
      throw ProtocolError(fmt::format("two certificates for index {}", index));
    }
    out.emplace_back(index, bounded_string(j, "certificate", max_certificate_bytes));
  }
  return out;
}

json
SecAggSignature::to_header() const
{
  return {{"task", task}, {"index", signature.index}, {"signature", signature.signature}};
}

SecAggSignature
SecAggSignature::from_header(const json& h)
{
  return {header_uint(h, "task"), {site_index(h, "index"), bounded_string(h, "signature", max_signature_bytes)}};
}

json
SecAggReveal::to_header() const
{
  json seeds = json::array();
  for (const auto& s : reveal.seeds) {
    seeds.push_back(share_json(s));
  }
  json keys = json::array();
  for (const auto& s : reveal.keys) {
    keys.push_back(share_json(s));
  }
  return {{"task", task}, {"index", reveal.index}, {"seeds", std::move(seeds)}, {"keys", std::move(keys)}};
}

SecAggReveal
SecAggReveal::from_header(const json& h, std::size_t max_shares)
{
  SecAggReveal out{header_uint(h, "task"), {site_index(h, "index"), {}, {}}};
  const auto& seeds = header_array(h, "seeds", max_shares);
  const auto& keys = header_array(h, "keys", max_shares);
  if (seeds.size() + keys.size() > max_shares) {
    throw ProtocolError(fmt::format("a reveal of {} shares, more than {}", seeds.size() + keys.size(), max_shares));
  }
  for (const auto& j : seeds) {
    out.reveal.seeds.push_back(share_from(j));
  }
  for (const auto& j : keys) {
    out.reveal.keys.push_back(share_from(j));
  }
  return out;
}

} // namespace fedl::core
