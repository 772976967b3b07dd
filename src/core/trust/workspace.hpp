// SPDX-License-Identifier: Apache-2.0
// The layout of a federation workspace (DESIGN §3) and the facts derived from it.
#pragma once

#include "core/config/config.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/pki.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace fedl::core {

class Workspace
{
public:
  explicit Workspace(std::filesystem::path root) : m_root(std::move(root)) {}

  const std::filesystem::path& root() const { return m_root; }
  std::filesystem::path config() const { return m_root / "fedl.json"; }
  std::filesystem::path ledger() const { return m_root / "ledger.jsonl"; }
  std::filesystem::path pki() const { return m_root / "pki"; }
  std::filesystem::path ca_cert() const { return pki() / "ca.crt"; }
  std::filesystem::path ca_key() const { return pki() / "ca.key"; }
  std::filesystem::path server_cert() const { return pki() / "server.crt"; }
  std::filesystem::path server_key() const { return pki() / "server.key"; }
  std::filesystem::path crl() const { return pki() / "crl.pem"; }
  std::filesystem::path clients() const { return m_root / "clients"; }
  std::filesystem::path client(const std::string& name) const { return clients() / name; }
  std::filesystem::path models() const { return m_root / "models"; }
  std::filesystem::path state() const { return m_root / "state"; }
  std::filesystem::path data() const { return m_root / "data"; }
  // The best model so far, a hard link to one of models/ (core/federation/best_model.hpp).
  std::filesystem::path best_model() const { return models() / "best.safetensors"; }
  // What a running coordinator shows (fedl status; core/federation/status.hpp).
  std::filesystem::path status_file() const { return state() / "status.json"; }
  // models/global-NNNNNN.safetensors, relative to the root (as the ledger records it).
  static std::string model_name(std::uint64_t round);
  std::filesystem::path model(std::uint64_t round) const { return m_root / model_name(round); }

  // Throws UsageError if `root` does not look like a workspace (no fedl.json or ledger).
  void require_exists() const;

private:
  std::filesystem::path m_root;
};

// Throws UsageError unless `target` can become a new workspace: it does not exist, is an empty
// folder, or (with `replace`, fedl init --force) is a workspace. Never an arbitrary folder: a
// mistyped path must not be wiped.
void check_can_create_workspace(const std::filesystem::path& target, bool replace);

// Creates the workspace `target` whole or not at all: `fill` writes everything into a staging
// folder beside it (a Workspace rooted there), which then takes the place of `target` (see
// check_can_create_workspace, checked again first). If `fill` throws, the staging folder is
// removed and `target` is as it was.
void create_workspace(const std::filesystem::path& target, bool replace,
                      const std::function<void(const Workspace& staging)>& fill);

// Provisions the PKI, the client bundles, fedl.json and the ledger's genesis entry in `ws`,
// whose folder exists and already holds the initial model (models/global-000000.safetensors)
// and, for a TorchScript model, model.pt. `name` names the federation in its CA certificate.
// Returns the genesis entry's body.
nlohmann::json provision_workspace(const Workspace& ws, const FederationConfig& config, const std::string& name);

// Issues a certificate for a new site, writes its bundle (clients/NAME: client.crt, client.key,
// ca.crt, join.json, and model.pt for TorchScript models), adds it to fedl.json and records a
// client-added entry. Throws UsageError if the name is invalid or taken.
nlohmann::json add_client(const Workspace& ws, const std::string& name);

// Revokes a site's certificate: adds it to pki/crl.pem and records a revoked entry. Throws
// UsageError if there is no such site or it is already revoked.
nlohmann::json revoke_client(const Workspace& ws, const std::string& name);

// The workspace's ledger, read and verified against pki/server.crt (see read_ledger).
std::vector<LedgerEntry> read_workspace_ledger(const Workspace& ws);
// The same one entry at a time (see for_each_ledger_entry), from `from` if given (advanced).
void for_each_workspace_entry(const Workspace& ws, const std::function<void(LedgerEntry&&)>& visit,
                              LedgerPosition* from = nullptr);

// Every site that `entries` (the workspace's ledger) records as revoked is listed in pki/crl.pem:
// a CRL restored from before a revocation would quietly let the site back in. Throws VerifyError
// naming the site and the ledger line.
void check_revocations(const Workspace& ws, const std::vector<LedgerEntry>& entries);
// The same, reading the workspace's ledger one entry at a time.
void check_revocations(const Workspace& ws);

// The latest global model the ledger records: the genesis model or the last round's.
struct LatestModel
{
  std::uint64_t round = 0; // 0: the initial model
  std::string file;        // relative to the workspace root
  std::string sha256;

  // Takes the model of a genesis or round entry (entries in ledger order); ignores other kinds.
  // Throws VerifyError if such an entry lacks the fields.
  void update(const LedgerEntry& e);
};
// Throws VerifyError if an entry lacks the fields.
LatestModel latest_model(const std::vector<LedgerEntry>& entries);

// Signs ledger entries with the coordinator's key (pki/server.key).
Signer ledger_signer(const Workspace& ws);
// Verifies ledger entries against a certificate's public key.
Verifier ledger_verifier(const Cert& cert);
// Appends an entry signed with the coordinator's key.
LedgerEntry append_signed(const Workspace& ws, const std::string& kind, const nlohmann::json& body);

// An exclusive lock on the workspace (flock on WS/.lock) for a command that changes it, so that
// two commands cannot both write round N or interleave ledger appends. `fedl serve` holds the
// change lock only while it writes a round (so that `init --add-client` or `--revoke` can run
// beside a live coordinator) and the serve lock (WS/.serve.lock) for its whole run. Throws Error
// (exit 1) if another process still holds it after `wait_seconds`.
class WorkspaceLock
{
public:
  enum class Kind
  {
    change,
    serve
  };
  explicit WorkspaceLock(const Workspace& ws, Kind kind = Kind::change, double wait_seconds = 0);
  WorkspaceLock(const WorkspaceLock&) = delete;
  WorkspaceLock& operator=(const WorkspaceLock&) = delete;
  ~WorkspaceLock();

private:
  int m_fd = -1;
};

} // namespace fedl::core
