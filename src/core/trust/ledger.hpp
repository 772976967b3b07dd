// SPDX-License-Identifier: Apache-2.0
// The ledger: a hash-chained, signed record of everything that happened in a federation, as
// JSON Lines (DESIGN §3, §9). Each line is one object
//   {"seq": N, "time": "...Z", "kind": "genesis|round|client-added|revoked|...", "body": {...},
//    "prev": "<SHA-256 of the previous line's bytes without its newline; 64 zeros for seq 0>",
//    "sig": "<signature>"}
// whose signature covers the object without "sig", serialized compactly with sorted keys.
// Appends are one write of the whole line followed by fsync.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

// Signs the bytes of an entry; returns the signature text.
using Signer = std::function<std::string(std::string_view payload)>;
// True if `signature` is a valid signature of `payload`.
using Verifier = std::function<bool(std::string_view payload, const std::string& signature)>;

struct LedgerEntry
{
  std::uint64_t seq = 0;
  std::string time;
  std::string kind;
  nlohmann::json body;
  std::string prev;
  std::string sig;
  std::size_t line = 0; // 1-based line number in the file
};

// The bytes that an entry's signature covers.
std::string ledger_signed_payload(const nlohmann::json& entry_without_sig);
// The one serialization of a ledger object: compact, keys sorted (nlohmann's order), UTF-8
// unescaped. Every line of a ledger is exactly canonical_json of its object; read_ledger refuses
// any other form.
std::string canonical_json(const nlohmann::json& j);

// The head of a ledger: its last entry's sequence number and the SHA-256 of that line (without
// its newline), which chains everything before it. Sites keep heads signed by the coordinator
// as receipts (see receipt.hpp). Throws VerifyError if there is no complete last line.
struct LedgerHead
{
  std::uint64_t seq = 0;
  std::string sha256;
};
LedgerHead ledger_head(const std::filesystem::path& path);

// Appends a new entry of `kind` with `body`, chained to the last line, and returns it. Creates
// the file for the first (genesis) entry. Throws VerifyError if the last line is incomplete or
// not JSON (run fedl audit), Error for I/O.
LedgerEntry append_ledger(const std::filesystem::path& path, const std::string& kind, const nlohmann::json& body,
                          const Signer& sign);

// Reads and verifies the whole ledger: every line is canonical JSON with the fields above, seq counts
// from 0 without gaps, prev chains each line to the one before, and every signature verifies.
// Throws VerifyError naming the first broken line and what is wrong with it.
std::vector<LedgerEntry> read_ledger(const std::filesystem::path& path, const Verifier& verify);
// The same, one entry at a time: each entry is checked (with the chain up to it) before `visit`
// sees it, and only one is held in memory, so that a long ledger costs a round its file mapping,
// not a parsed tree of every entry. An exception leaves `visit` having seen a verified prefix.
void for_each_ledger_entry(const std::filesystem::path& path, const Verifier& verify,
                           const std::function<void(LedgerEntry&&)>& visit);

// Where a verified read of a ledger stopped, so that the next read (a coordinator plans every
// round) parses and verifies only the entries appended since: the bytes and entries read, the
// SHA-256 of those bytes and of the last line. Empty: nothing read yet.
struct LedgerPosition
{
  std::uint64_t bytes = 0;
  std::uint64_t entries = 0;
  std::string prefix_sha256; // of bytes [0, bytes); empty while bytes is 0
  std::string last_line_sha256;
};
// for_each_ledger_entry for the entries after `from`, which it then advances. Hashing the bytes
// already read is ~100× cheaper than verifying them again (parsing, canonical form, signature),
// and refuses the same changes: VerifyError if the file no longer starts with exactly what was
// read (it was rewritten, truncated or replaced: run fedl audit).
void for_each_ledger_entry(const std::filesystem::path& path, const Verifier& verify,
                           const std::function<void(LedgerEntry&&)>& visit, LedgerPosition& from);

} // namespace fedl::core
