// SPDX-License-Identifier: Apache-2.0
// Fuzz target "ledger": read_ledger (core/trust/ledger.hpp) on the bytes of a ledger.jsonl, with a
// verifier that accepts every signature so that the fuzzer gets past them to the chain and the
// entries (and each input a second time with its hash chain repaired, see rechained); then what
// every reader does with the entries: LedgerState (the latest model, the privacy accounts, the
// accuracy, the client-level DP) replayed as serve's resume and a round plan do (without
// verification) and as fedl audit does (verifying each recorded epsilon, then
// round_privacy_text), and serve's check_not_weaker on what the replay found. Each documents
// VerifyError for a bad entry (UsageError for check_not_weaker); anything else escapes and is a
// finding.
#include "fuzz.hpp"

#include "core/federation/ledger_state.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

using namespace fedl;

namespace {

// The input with each line's "prev" made the SHA-256 of the line before (64 zeros on the first),
// where a line has a "prev":"<64 characters>" to rewrite; empty if nothing changed. A mutation
// anywhere but in the last line breaks the chain, so without this the fuzzer would seldom get
// past read_ledger's chain check to the entries of a longer ledger.
std::string
rechained(std::string_view text)
{
  static constexpr std::string_view key = "\"prev\":\"";
  std::string out;
  std::string previous;
  std::size_t pos = 0;
  bool changed = false;
  while (pos < text.size()) {
    const auto nl = text.find('\n', pos);
    std::string line(text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos));
    pos = nl == std::string_view::npos ? text.size() : nl + 1;
    const auto at = line.find(key);
    if (at != std::string::npos && at + key.size() + 65 <= line.size() && line[at + key.size() + 64] == '"') {
      const auto want = previous.empty() ? std::string(64, '0') : core::sha256_hex(core::as_bytes(previous));
      if (line.compare(at + key.size(), 64, want) != 0) {
        line.replace(at + key.size(), 64, want);
        changed = true;
      }
    }
    out += line;
    if (nl != std::string_view::npos) {
      out += '\n';
    }
    previous = std::move(line);
  }
  return changed ? out : std::string();
}

void
read(fuzz::Bytes in)
{
  const auto path = fuzz::scratch().write("ledger.jsonl", in);
  std::vector<core::LedgerEntry> entries;
  try {
    entries = core::read_ledger(path, [](std::string_view, const std::string&) { return true; });
  } catch (const core::VerifyError& e) {
    fuzz::refused(e);
    return;
  }
  FEDL_FUZZ_CHECK(!entries.empty() && entries.front().kind == "genesis");
  for (std::size_t i = 0; i < entries.size(); ++i) {
    FEDL_FUZZ_CHECK(entries[i].seq == i && entries[i].line == i + 1);
  }
  // As serve's resume and a round plan replay it, then as fedl audit does; each stops at the
  // first entry it refuses, as they do.
  for (const bool verify : {false, true}) {
    core::LedgerState state;
    try {
      for (const auto& entry : entries) {
        state.apply(entry, verify);
        if (verify && entry.kind == "round") {
          (void)core::round_privacy_text(entry.body);
        }
      }
    } catch (const core::VerifyError& e) {
      fuzz::refused(e);
      continue;
    }
    // serve's check that a restart does not weaken the privacy the rounds recorded.
    try {
      core::check_not_weaker(state.client_dp, core::PrivacyConfig{}, state.model.round);
    } catch (const core::UsageError& e) {
      fuzz::refused(e);
    }
  }
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  read({data, size});
  if (const auto chained = rechained(fuzz::as_text({data, size})); !chained.empty()) {
    read({reinterpret_cast<const std::uint8_t*>(chained.data()), chained.size()});
  }
  return 0;
}
