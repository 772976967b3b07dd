// SPDX-License-Identifier: Apache-2.0
// Ledger receipts: what makes a rolled-back or rewritten ledger detectable (in the spirit of
// Certificate Transparency's signed tree heads, RFC 6962 §3.5). A hash chain alone cannot show
// that trailing entries were dropped, and the operator holds the key that signs the ledger, so
// it could rewrite it whole. So with every task and with the final "done", the coordinator
// sends its ledger head (the last entry's sequence number and line SHA-256, which chains all
// before it), signed with its key; each site checks the signature against the coordinator's
// TLS certificate and appends the head to DIR/receipts.jsonl. `fedl audit WS --witness DIR...`
// then finds every receipt's entry in the ledger with that very hash, or fails.
//
// The signed bytes: canonical JSON {"ca": CA fingerprint, "fedl": "ledger-head-v1", "seq": N,
// "sha256": line hash} (so a head of one federation is no receipt for another).
// A receipts.jsonl line: {"ca", "seq", "sha256", "sig", "time"} (time: when the site got it).
#pragma once

#include "core/trust/ledger.hpp"
#include "core/trust/pki.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace fedl::core {

struct Receipt
{
  std::uint64_t seq = 0;
  std::string sha256; // of ledger line seq, without its newline
  std::string ca;     // the federation CA's fingerprint
  std::string sig;    // the coordinator's signature of receipt_payload
  std::string time;   // when the site received it ("" in frames)
};

// The bytes a receipt's signature covers.
std::string receipt_payload(std::uint64_t seq, const std::string& sha256, const std::string& ca);

// The coordinator's signed head for `head`, as frames carry it: {"seq", "sha256", "ca", "sig"}.
nlohmann::json signed_head(const Identity& coordinator, const LedgerHead& head, const std::string& ca_fingerprint);

// A head from a frame (or a receipts.jsonl line), checked for shape and bounds: seq an unsigned
// integer, sha256 and ca 64 lowercase hex digits, sig at most 200 characters. nullopt if not.
std::optional<Receipt> parse_receipt(const nlohmann::json& j);

// True if the receipt's signature verifies with `coordinator` (the certificate that signed it).
bool verify_receipt(const Receipt& r, const Cert& coordinator) noexcept;

// A site's receipts.jsonl (read when constructed; a file that is not one throws VerifyError).
// add() appends a verified head unless the file already holds one for
// the same entry with the same hash (fsync'd); it returns a warning when the head shows the
// coordinator's ledger going backwards or forking from an earlier receipt (kept as evidence).
class ReceiptLog
{
public:
  explicit ReceiptLog(std::filesystem::path path);
  std::optional<std::string> add(Receipt r);

private:
  std::filesystem::path m_path;
  std::map<std::uint64_t, std::set<std::string>> m_held; // seq -> hashes the file holds
};

// What `fedl audit WS --witness DIR` checks: every receipt in DIR/receipts.jsonl (a site's
// folder) against the ledger `entries` whose last line has SHA-256 `last_sha256`: a valid
// signature by `coordinator` for this federation (CA fingerprint `ca`), an entry with that seq
// (else the ledger is shorter than what the site saw), and that entry's line hash equal to the
// receipt's (else the ledger diverges from it). Throws VerifyError naming the site folder, the
// receipt and what is wrong; returns the number of receipts checked and the highest seq.
struct WitnessCheck
{
  std::size_t receipts = 0;
  std::uint64_t highest_seq = 0;
};
WitnessCheck check_witness(const std::filesystem::path& site_dir, const std::vector<LedgerEntry>& entries,
                           const std::string& last_sha256, const Cert& coordinator, const std::string& ca);

// Reads DIR/receipts.jsonl (empty if there is none). Throws VerifyError naming the line that is
// not a receipt.
std::vector<Receipt> read_receipts(const std::filesystem::path& file);

} // namespace fedl::core
