// SPDX-License-Identifier: Apache-2.0
#include "core/trust/ledger.hpp"

#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

const std::string k_genesis_prev(64, '0');
constexpr std::size_t max_ledger_nesting = 16;

std::string
read_text(const fs::path& path)
{
  if (!fs::exists(path)) {
    return {};
  }
  const MappedFile f(path);
  return {reinterpret_cast<const char*>(f.bytes().data()), f.bytes().size()};
}

std::vector<std::string_view>
split_lines(std::string_view text)
{
  std::vector<std::string_view> lines;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto nl = text.find('\n', pos);
    if (nl == std::string_view::npos) {
      nl = text.size();
    }
    lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

} // namespace

std::string
ledger_signed_payload(const nlohmann::json& entry_without_sig)
{
  return canonical_json(entry_without_sig);
}

std::string
canonical_json(const nlohmann::json& j)
{
  // Invalid UTF-8 cannot reach here from a peer (its text is checked where it arrives); should
  // any slip through, it is written as U+FFFD rather than losing the entry.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

LedgerHead
ledger_head(const std::filesystem::path& path)
{
  const auto text = read_text(path);
  const auto lines = split_lines(text);
  if (lines.empty() || text.back() != '\n') {
    throw VerifyError("{}: no complete last line to take the head of; run fedl audit", path.string());
  }
  LedgerHead head;
  try {
    head.seq = nlohmann::json::parse(lines.back()).at("seq").get<std::uint64_t>();
  } catch (const nlohmann::json::exception&) {
    throw VerifyError("{}: line {} is not a ledger entry; run fedl audit", path.string(), lines.size());
  }
  head.sha256 = sha256_hex(as_bytes(lines.back()));
  return head;
}

LedgerEntry
append_ledger(const fs::path& path, const std::string& kind, const nlohmann::json& body, const Signer& sign)
{
  const auto text = read_text(path);
  if (!text.empty() && text.back() != '\n') {
    throw VerifyError("{}: the last line is incomplete (an append was interrupted?); run fedl audit and "
                      "restore the ledger from a backup",
                      path.string());
  }
  const auto lines = split_lines(text);
  LedgerEntry e;
  e.kind = kind;
  e.body = body;
  e.time = utc_now();
  e.prev = k_genesis_prev;
  e.seq = 0;
  if (!lines.empty()) {
    const auto last = lines.back();
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(last);
      e.seq = j.at("seq").get<std::uint64_t>() + 1;
    } catch (const nlohmann::json::exception&) {
      throw VerifyError("{}: line {} is not a ledger entry; run fedl audit", path.string(), lines.size());
    }
    e.prev = sha256_hex(as_bytes(last));
  }
  nlohmann::json j = {{"seq", e.seq}, {"time", e.time}, {"kind", e.kind}, {"body", e.body}, {"prev", e.prev}};
  e.sig = sign(ledger_signed_payload(j));
  j["sig"] = e.sig;
  const std::string line = canonical_json(j) + "\n";
  e.line = lines.size() + 1;

  append_line(path, line);
  return e;
}

namespace {

// for_each_ledger_entry from `kept` (null: from the start, and nothing to keep).
void
read_entries(const fs::path& path, const Verifier& verify, const std::function<void(LedgerEntry&&)>& visit,
             LedgerPosition* kept)
{
  LedgerPosition start;
  const LedgerPosition& from = kept != nullptr ? *kept : start;
  if (!fs::exists(path)) {
    throw VerifyError("{} does not exist: this is not a fedl workspace or its ledger was deleted", path.string());
  }
  const auto text = read_text(path);
  if (text.empty()) {
    throw VerifyError("{} is empty: its genesis entry is missing", path.string());
  }
  if (text.back() != '\n') {
    throw VerifyError("{}: line {} is incomplete (no final newline)", path.string(), split_lines(text).size());
  }
  const auto bytes = as_bytes(text);
  if (from.bytes > 0 && (bytes.size() < from.bytes || sha256_hex(bytes.first(from.bytes)) != from.prefix_sha256)) {
    throw VerifyError("{}: its first {} lines changed since this process verified them (rewritten, truncated or "
                      "replaced): run fedl audit",
                      path.string(), from.entries);
  }
  std::string prev_hash = from.bytes > 0 ? from.last_line_sha256 : k_genesis_prev;
  const auto lines = split_lines(std::string_view(text).substr(from.bytes));
  for (std::size_t k = 0; k < lines.size(); ++k) {
    const std::size_t i = from.entries + k;
    const auto& line = lines[k];
    const auto where = fmt::format("{}: line {}", path.string(), i + 1);
    nlohmann::json j;
    if (json_nesting(line) > max_ledger_nesting) {
      throw VerifyError("{}: nests deeper than the {} levels a ledger entry has (the line was altered)", where,
                        max_ledger_nesting);
    }
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      throw VerifyError("{}: not valid JSON (the line was altered)", where);
    }
    // The signature covers the canonical form; a line in any other form (keys reordered, \u
    // escapes, spaces, a key twice) says the same to a JSON reader but is not the line that was
    // signed and chained, so it is refused rather than silently read as if it were.
    if (canonical_json(j) != line) {
      throw VerifyError("{}: not in canonical form (compact JSON, keys sorted, UTF-8 unescaped, each key once): "
                        "the line was rewritten",
                        where);
    }
    LedgerEntry e;
    e.line = i + 1;
    try {
      e.seq = j.at("seq").get<std::uint64_t>();
      e.time = j.at("time").get<std::string>();
      e.kind = j.at("kind").get<std::string>();
      e.body = j.at("body");
      e.prev = j.at("prev").get<std::string>();
      e.sig = j.at("sig").get<std::string>();
    } catch (const nlohmann::json::exception&) {
      throw VerifyError("{}: missing or mistyped ledger fields (seq, time, kind, body, prev, sig)", where);
    }
    if (j.size() != 6) {
      throw VerifyError("{}: unexpected fields in a ledger entry", where);
    }
    if (e.seq != i) {
      throw VerifyError("{}: sequence number {} where {} was expected (a line was deleted, inserted or moved)", where,
                        e.seq, i);
    }
    if (e.prev != prev_hash) {
      throw VerifyError("{}: prev does not match the SHA-256 of the line before (the chain is broken: a line "
                        "was altered, deleted or moved)",
                        where);
    }
    j.erase("sig");
    if (!verify(ledger_signed_payload(j), e.sig)) {
      throw VerifyError("{}: the signature does not verify against the coordinator's certificate", where);
    }
    if (i == 0 && e.kind != "genesis") {
      throw VerifyError("{}: line 1 is a {} entry, not the genesis entry", path.string(), e.kind);
    }
    prev_hash = sha256_hex(as_bytes(line));
    visit(std::move(e));
  }
  if (kept != nullptr) {
    kept->bytes = bytes.size();
    kept->entries += lines.size();
    kept->prefix_sha256 = sha256_hex(bytes);
    kept->last_line_sha256 = prev_hash;
  }
}

} // namespace

void
for_each_ledger_entry(const fs::path& path, const Verifier& verify, const std::function<void(LedgerEntry&&)>& visit)
{
  read_entries(path, verify, visit, nullptr);
}

void
for_each_ledger_entry(const fs::path& path, const Verifier& verify, const std::function<void(LedgerEntry&&)>& visit,
                      LedgerPosition& from)
{
  read_entries(path, verify, visit, &from);
}

std::vector<LedgerEntry>
read_ledger(const fs::path& path, const Verifier& verify)
{
  std::vector<LedgerEntry> entries;
  for_each_ledger_entry(path, verify, [&](LedgerEntry&& e) { entries.push_back(std::move(e)); });
  return entries;
}

} // namespace fedl::core
