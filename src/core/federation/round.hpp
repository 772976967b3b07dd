// SPDX-License-Identifier: Apache-2.0
// One round of a federation, the same for `fedl aggregate` (update files named on the command
// line) and `fedl serve` (update files received from the sites over TLS):
//
//   plan       plan_workspace_round(ws): the round number, the base model (the ledger's latest),
//              where the new model and the server state go. Outside a workspace
//              plan_standalone_round(base, out, state) names the files instead.
//   validate   validate_round(plan, candidates, on_bad): open, hash and check every update
//              against the base, check site signatures against the federation's CA and CRL (in a
//              workspace), refuse the same file or the same site twice and an update that a site
//              other than the one that delivered it made. Writes nothing, so that a coordinator
//              that finds too few updates accepted can run the round again.
//   commit     commit_round(validated, settings): aggregate, check that no update changed meanwhile,
//              write the model and the server state, evaluate, append the signed "round" ledger
//              entry.
//
// The caller holds the workspace lock (WorkspaceLock) from planning to committing, so that the
// round number and the base cannot change in between.
#pragma once

#include "core/config/config.hpp"
#include "core/federation/ledger_state.hpp"
#include "core/format/safetensors.hpp"
#include "core/math/aggregate.hpp"
#include "core/privacy/privacy.hpp"
#include "core/secagg/encoding.hpp"
#include "core/trust/update.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/error.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace fedl::core {

// Where a round starts from and what it writes.
struct RoundPlan
{
  std::optional<Workspace> workspace; // none: a standalone aggregation (no signatures needed, no ledger)
  std::uint64_t round = 0;            // the round being made; 0 outside a workspace
  std::filesystem::path base;         // the model the updates were trained from
  std::string recorded_base_sha256;   // the base's SHA-256 as the ledger records it; empty outside a workspace
  std::filesystem::path out;          // where the new model goes
  std::optional<std::filesystem::path> state_in;  // server optimizer state to start from, if it exists
  std::optional<std::filesystem::path> state_out; // where the advanced state goes
  // In a workspace: the privacy spent in the rounds before (replayed from the ledger), and the
  // DP-SGD that fedl.json's training asks of every update (an update without it, or with less
  // noise or a larger clip norm, is rejected).
  FederationPrivacy privacy;
  std::optional<DpSgdConfig> required_dp;
  // In a workspace: the best model before this round (the ledger's last "best"), if any.
  std::optional<BestModel> best;
  // In a workspace: fedl.json's limits on one update (its norm, its sample count); an update past
  // them is rejected. Outside a workspace: none.
  std::optional<LimitsConfig> limits;
  // Whether the updates' digests are recorded (in a workspace, or in fedl aggregate --json's
  // result). Without, an unsigned update is not hashed at all: nothing would keep its hash and no
  // signature needs it, and a hash pass costs more than the aggregation.
  bool record_digests = true;
};

// The next round of `ws`: reads and verifies its ledger (VerifyError if it is broken), takes the
// latest model as the base, models/global-NNNNNN.safetensors as the output and
// state/server-NNNNNN.safetensors of the previous and this round as the state. Call it with the
// workspace locked.
// `ledger`: a state of this workspace's ledger kept from the last round (a coordinator's), which
// is advanced over the entries since instead of reading the whole ledger again.
RoundPlan plan_workspace_round(const Workspace& ws, LedgerState* ledger = nullptr);

// A round outside a workspace: `base` to `out`, with the server state read from and written back
// to `state` if given (without it the stateful strategies start afresh every run).
RoundPlan plan_standalone_round(const std::filesystem::path& base, const std::filesystem::path& out,
                                const std::optional<std::filesystem::path>& state);

// An update file offered for a round.
struct RoundCandidate
{
  std::filesystem::path path;
  // Non-empty: the site that delivered the file (authenticated by TLS); the update's fedl.site
  // must be this site, else it is rejected. Empty: any site (files named on a command line).
  std::string expected_site;
  // The caller wrote the file itself in a folder only it writes to (fedl serve's
  // state/incoming/): nobody can change it under the mapping, so commit_round skips the second
  // hash that guards files named on a command line.
  bool owned = false;
  // For an owned file: its digest as computed while its bytes arrived (UpdateDigester), which
  // validate_round then takes instead of reading the file again.
  std::optional<UpdateDigest> streamed{};
};

// A DP-SGD report (fedl.dp's JSON text; none if the update has none, parsed into `dp`) against
// the DP-SGD a federation requires: the reason it falls short, or nothing.
std::optional<std::string> check_dp_report(const std::optional<std::string>& text,
                                           const std::optional<DpSgdConfig>& required, std::optional<DpSgdReport>& dp);

// What to do with an update that cannot be accepted.
enum class OnBadUpdate
{
  fail,
  skip
};

// Thrown by validate_round with OnBadUpdate::fail: the update `path` is not fit for the round
// because of `reason`. what() is "update PATH: REASON"; a command adds how to skip bad updates.
class BadUpdateError : public VerifyError
{
public:
  BadUpdateError(std::filesystem::path path, std::string reason);

  const std::filesystem::path& path() const noexcept { return m_path; }
  const std::string& reason() const noexcept { return m_reason; }

private:
  std::filesystem::path m_path;
  std::string m_reason;
};

// An update that passed every check, kept mapped until the round is committed.
struct AcceptedUpdate
{
  std::filesystem::path path;
  std::string site;        // fedl.site; empty for an unsigned update outside a workspace
  std::string fingerprint; // fedl.cert_sha256; empty if unsigned
  std::uint64_t samples = 0;
  // When it was checked: v2, the digest its signature covers; else its file's SHA-256; empty for
  // an unsigned update whose digest nothing records (RoundPlan::record_digests).
  UpdateDigest digest;
  SafetensorsFile file;
  bool owned = false;            // RoundCandidate::owned
  std::optional<DpSgdReport> dp; // fedl.dp: how it was trained with DP-SGD, if it says so
};

struct ValidatedRound
{
  RoundPlan plan;
  SafetensorsFile base;
  std::string base_sha256;
  std::vector<AcceptedUpdate> accepted; // in the order of the candidates
  // [{"file": file name, "site": fedl.site or "", "reason": sentence}], as the ledger records them
  nlohmann::json rejected = nlohmann::json::array();
  OnBadUpdate on_bad = OnBadUpdate::fail; // as validate_round was asked, for the values commit_round checks
};

// Opens the plan's base (VerifyError if, in a workspace, its SHA-256 is not the ledger's: it was
// replaced or altered) and checks each candidate in order: readable safetensors, not the same
// bytes as an earlier candidate, validate_update against the base, the site's signature (in a
// workspace: required, and its certificate must be issued by the federation's CA and not be
// revoked; outside: checked against its own certificate if signed), fedl.site equal to
// expected_site if given, within the plan's limits, and no earlier accepted update from the same
// site. No check throws for anything an update holds: a reason is recorded instead, valid UTF-8
// and bounded (a site chooses the values it quotes); a rejected update's "site" is the one that
// delivered it (expected_site), else the one its verified signature names, else "". A candidate that
// fails a check throws BadUpdateError with OnBadUpdate::fail; with skip it is logged and listed
// in `rejected`. Writes nothing. Returns with no update accepted rather than throwing, so that a
// caller can tell a missed quorum from an error; commit_round refuses an empty round.
// The updates' values (NaN or infinite, the norm limit) are not read here: commit_round checks
// them in the pass that aggregates them, and leaves out (or, with fail, throws BadUpdateError
// for) an update that is not fit, as this would have.
ValidatedRound validate_round(const RoundPlan& plan, std::span<const RoundCandidate> candidates, OnBadUpdate on_bad);

// The server options that fedl.json's server_optimizer sets (clip_norm and threads unset).
ServerOptions configured_server_options(const FederationConfig& config);

struct RoundSettings
{
  StrategySpec strategy;
  ServerOptions options; // validated with validate_server_options first
  // Optional: called with the new model's path once it is written; a non-null result is recorded
  // in the ledger body as "evaluation". If it throws, nothing is recorded and the round can be
  // run again.
  std::function<nlohmann::json(const std::filesystem::path& model)> evaluate;
  // A JSON object merged into the ledger body (e.g. {"attempt": 2, "late": [...]}); its keys must
  // not be those of the body itself (Error otherwise, before anything is written).
  nlohmann::json extra = nlohmann::json::object();
  // Recorded in the entry's "privacy" with the sites' DP-SGD reports (see FederationPrivacy):
  // the round's client-level DP (options.client_dp must match it) and the federation's budget.
  std::optional<ClientDpRound> client_dp;
  std::optional<double> max_epsilon;
  // How the round's ε are computed (the ledger records it).
  Accountant accountant = Accountant::pld_v1;
  // The fewest accepted updates a round is made of (fedl serve's --min-clients; at least 1).
  std::size_t quorum = 1;
  // With an evaluation: the metric that picks the best model (recorded as "best", and
  // models/best.safetensors linked to it).
  std::optional<BestMetric> best_metric = std::nullopt;
};

// Thrown by commit_round, which then wrote nothing, when the updates whose values were not fit
// left fewer than RoundSettings::quorum accepted (the ValidatedRound lists them as rejected).
class ShortOfQuorum : public VerifyError
{
public:
  ShortOfQuorum(std::size_t left, std::size_t rejected);
};

struct RoundResult
{
  std::filesystem::path model;
  std::string sha256;   // of the model file as written
  std::string strategy; // canonical spec
  // [{file, site, fingerprint, num_samples, update_sha256 | signature_version: 2, update_digest}]
  nlohmann::json participants = nlohmann::json::array();
  nlohmann::json rejected = nlohmann::json::array();
  AggregateInfo info;         // info.selected: krum's and multi-krum's choice
  std::uint64_t round = 0;    // 0 outside a workspace
  nlohmann::json evaluation;  // the evaluate callback's result, or null
  nlohmann::json ledger_body; // the "round" entry's body; null outside a workspace
};

// Aggregates the accepted updates with the plan's server state (VerifyError if none was accepted,
// or if the new model has a value that is not finite: nothing is written), checking their values
// in the same pass (an update not fit moves from validated.accepted to validated.rejected, or
// throws BadUpdateError if validated.on_bad is fail, and the round is aggregated again without it;
// ShortOfQuorum if too few are left), re-hashes them (VerifyError if one changed
// on disk since it was checked: nothing is written), writes the model atomically and the advanced server state, and in
// a workspace appends the signed "round" entry {round, strategy, options, base, model, participants, rejected,
// [limits], [evaluation], [privacy], extra...} and removes the state two rounds back, which a re-run can no longer
// need. Call it with the workspace locked.
RoundResult commit_round(ValidatedRound& validated, const RoundSettings& settings);

// fedl serve's round thread: one attempt at round `round` of `ws` with the updates received.
// Locks the workspace, plans (Error if the ledger is past `round`: another process wrote a
// round), validates (skipping bad updates), and commits with `settings` if at least `quorum` are
// valid; else appends a "round-failed" entry (settings.extra, the reason and the rejected
// updates) and returns the reason as `retry`.
struct AttemptOutcome
{
  nlohmann::json committed; // the round entry's body
  std::string retry;
};
// `ledger`: as plan_workspace_round's.
AttemptOutcome commit_attempt(const Workspace& ws, std::uint64_t round, std::span<const RoundCandidate> candidates,
                              std::uint32_t quorum, const RoundSettings& settings, LedgerState* ledger = nullptr);

// A secure aggregation attempt as the coordinator ends it (federation/secure_round.hpp): the sum
// of the survivors' encoded updates, or why there is none.
struct SecureSum
{
  std::vector<std::uint32_t> words; // mod 2^32
  secagg::Encoding encoding;
  nlohmann::json record;                           // SecureRound::record(), for the ledger
  std::map<std::string, std::string> fingerprints; // the survivors' certificates
  std::map<std::string, DpSgdReport> dp;           // their signed DP-SGD reports
  std::string failure;                             // non-empty: the attempt failed
};

// fedl serve's round thread, with secure aggregation: the round from the unmasked sum (decoded,
// client-level noise added after unmasking, the server optimizer on the mean), with the entry's
// "secure_aggregation" (sum.record and the total weight) and its survivors as participants; or,
// with a failure, a "round-failed" entry and the reason as `retry`.
AttemptOutcome commit_secure_attempt(const Workspace& ws, std::uint64_t round, const SecureSum& sum,
                                     const RoundSettings& settings, LedgerState* ledger = nullptr);

} // namespace fedl::core
