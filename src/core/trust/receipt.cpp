// SPDX-License-Identifier: Apache-2.0
#include "core/trust/receipt.hpp"

#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <algorithm>
#include <fstream>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

bool
is_hex64(const nlohmann::json& j)
{
  if (!j.is_string()) {
    return false;
  }
  return is_sha256_hex(j.get_ref<const std::string&>());
}

} // namespace

std::string
receipt_payload(std::uint64_t seq, const std::string& sha256, const std::string& ca)
{
  return canonical_json({{"fedl", "ledger-head-v1"}, {"seq", seq}, {"sha256", sha256}, {"ca", ca}});
}

nlohmann::json
signed_head(const Identity& coordinator, const LedgerHead& head, const std::string& ca_fingerprint)
{
  return {{"seq", head.seq},
          {"sha256", head.sha256},
          {"ca", ca_fingerprint},
          {"sig", sign(coordinator.key, as_bytes(receipt_payload(head.seq, head.sha256, ca_fingerprint)))}};
}

std::optional<Receipt>
parse_receipt(const nlohmann::json& j)
{
  if (!j.is_object() || !j.contains("seq") || !j["seq"].is_number_unsigned() ||
      !is_hex64((j.contains("sha256") ? j["sha256"] : nlohmann::json())) ||
      !is_hex64((j.contains("ca") ? j["ca"] : nlohmann::json())) || !j.contains("sig") || !j["sig"].is_string() ||
      j["sig"].get_ref<const std::string&>().size() > 200) {
    return std::nullopt;
  }
  Receipt r;
  r.seq = j["seq"].get<std::uint64_t>();
  r.sha256 = j["sha256"].get<std::string>();
  r.ca = j["ca"].get<std::string>();
  r.sig = j["sig"].get<std::string>();
  if (const auto t = j.find("time"); t != j.end() && t->is_string() && t->get_ref<const std::string&>().size() <= 64) {
    r.time = t->get<std::string>();
  }
  return r;
}

bool
verify_receipt(const Receipt& r, const Cert& coordinator) noexcept
{
  try {
    return verify_signature(coordinator, as_bytes(receipt_payload(r.seq, r.sha256, r.ca)), r.sig);
  } catch (...) {
    return false;
  }
}

std::vector<Receipt>
read_receipts(const fs::path& file)
{
  std::vector<Receipt> out;
  std::ifstream in(file);
  if (!in) {
    if (fs::exists(file)) {
      throw Error("cannot read {}", file.string());
    }
    return out;
  }
  std::string line;
  for (std::size_t n = 1; std::getline(in, line); ++n) {
    std::optional<Receipt> r;
    if (line.size() <= 4096 && json_nesting(line) <= 1) {
      r = parse_receipt(nlohmann::json::parse(line, nullptr, false));
    }
    if (!r) {
      throw VerifyError("{}: line {} is not a ledger receipt", file.string(), n);
    }
    out.push_back(std::move(*r));
  }
  return out;
}

WitnessCheck
check_witness(const fs::path& site_dir, const std::vector<LedgerEntry>& entries, const std::string& last_sha256,
              const Cert& coordinator, const std::string& ca)
{
  const auto file = site_dir / "receipts.jsonl";
  if (!fs::is_directory(site_dir)) {
    throw UsageError("--witness {}: not a folder (give a site's bundle folder, where fedl join keeps receipts.jsonl)",
                     site_dir.string());
  }
  const auto receipts = read_receipts(file);
  WitnessCheck out;
  for (std::size_t i = 0; i < receipts.size(); ++i) {
    const auto& r = receipts[i];
    const auto where = fmt::format("{}: line {} (ledger entry {})", file.string(), i + 1, r.seq);
    if (r.ca != ca) {
      throw VerifyError("{}: the receipt is for another federation (CA {})", where, r.ca.substr(0, 16));
    }
    if (!verify_receipt(r, coordinator)) {
      throw VerifyError("{}: the receipt's signature does not verify against the coordinator's certificate", where);
    }
    if (r.seq >= entries.size()) {
      throw VerifyError("{}: the ledger has {} entries, but the coordinator showed this site entry {} (received {}): "
                        "entries were removed from the end of the ledger (rolled back)",
                        where, entries.size(), r.seq, r.time.empty() ? "?" : r.time);
    }
    const auto& actual = r.seq + 1 < entries.size() ? entries[r.seq + 1].prev : last_sha256;
    if (actual != r.sha256) {
      throw VerifyError("{}: ledger line {} has SHA-256 {}, but the coordinator showed this site {} (received {}): "
                        "the ledger was rewritten from there on",
                        where, r.seq + 1, actual.substr(0, 16), r.sha256.substr(0, 16), r.time.empty() ? "?" : r.time);
    }
    ++out.receipts;
    out.highest_seq = std::max(out.highest_seq, r.seq);
  }
  return out;
}

ReceiptLog::ReceiptLog(fs::path path) : m_path(std::move(path))
{
  for (const auto& r : read_receipts(m_path)) {
    m_held[r.seq].insert(r.sha256);
  }
}

std::optional<std::string>
ReceiptLog::add(Receipt r)
{
  const auto same = m_held.find(r.seq);
  if (same != m_held.end() && same->second.count(r.sha256) > 0) {
    return std::nullopt;
  }
  std::optional<std::string> warning;
  if (same != m_held.end()) {
    warning = fmt::format("the coordinator's ledger entry {} is not the one it showed this site before: its ledger "
                          "was rewritten (both heads are kept in {}; run fedl audit WS --witness)",
                          r.seq, m_path.string());
  } else if (!m_held.empty() && r.seq < m_held.rbegin()->first) {
    warning = fmt::format("the coordinator's ledger ends at entry {}, before entry {} that it showed this site "
                          "before: it was rolled back (both heads are kept in {}; run fedl audit WS --witness)",
                          r.seq, m_held.rbegin()->first, m_path.string());
  }
  r.time = utc_now();
  const nlohmann::json j = {{"seq", r.seq}, {"sha256", r.sha256}, {"ca", r.ca}, {"sig", r.sig}, {"time", r.time}};
  const auto line = canonical_json(j) + "\n";
  append_line(m_path, line);
  m_held[r.seq].insert(r.sha256);
  return warning;
}

} // namespace fedl::core
