// SPDX-License-Identifier: Apache-2.0
// Privacy accounting across rounds (core/math/accountant.hpp and pld.hpp do the arithmetic):
//
//   PrivacyAccount     everything spent so far, as the mechanisms composed: steps per (q, σ) of
//                      the sampled Gaussian. Any accountant turns it into (ε, δ) when asked, so a
//                      federation or a site keeps one and converts it with the accountant it uses.
//   DpSgdReport        what a site says about one DP-SGD training run (q, σ, steps, δ, ε): the
//                      update's fedl.dp metadata, signed with the update.
//   FederationPrivacy  the federation's account, replayed from the ledger's "round" entries:
//                      client-level DP (one Gaussian step per round at the client sampling rate,
//                      or at rate 1 where the selection was not secret) and each site's
//                      sample-level DP-SGD runs. The coordinator records each round with it, and
//                      `fedl audit` recomputes every recorded ε with it, by the accountant that
//                      each round records.
//   SiteAccount        a site's own account, DIR/privacy.jsonl: the same JSON-lines format as the
//                      ledger (hash-chained, signed with the site's key), so that an altered line
//                      is detected; the site trusts it over nobody's word but its own, and takes
//                      the larger of it and what the coordinator's ledger says it spent.
#pragma once

#include "core/config/config.hpp"
#include "core/math/accountant.hpp"
#include "core/trust/pki.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace fedl::core {

class PrivacyAccount
{
public:
  // At most this many distinct (q, σ) in an account a peer sends (from_json): each costs the PLD
  // accountant a discretization and an FFT, tens of milliseconds. A site's runs have a few.
  static constexpr std::size_t max_mechanisms = 64;

  // Adds `steps` steps of the sampled Gaussian mechanism (rate q, noise multiplier σ).
  void add(double q, double sigma, std::uint64_t steps);
  // Makes each mechanism's steps the larger of this account's and `other`'s: a composition that
  // contains both, so its ε bounds either's.
  void merge_max(const PrivacyAccount& other);
  // ε at `delta` by accountant `a` (0 for an empty account).
  PrivacySpent epsilon(double delta, Accountant a) const;
  bool empty() const noexcept { return m_steps.empty(); }
  std::vector<GaussianSteps> parts() const;

  // {"mechanisms": [{"sample_rate", "noise_multiplier", "steps"}, ...]}, and back: Error naming
  // `what` for anything else (values out of range, more than max_mechanisms distinct ones).
  nlohmann::json to_json() const;
  static PrivacyAccount from_json(const nlohmann::json& j, const std::string& what);

private:
  std::map<std::pair<double, double>, std::uint64_t> m_steps; // (q, σ) → steps
};

// One DP-SGD training run as the site reports it.
struct DpSgdReport
{
  double noise_multiplier = 0;
  double max_grad_norm = 0;
  double sample_rate = 0; // q = batch size / samples
  std::uint64_t steps = 0;
  double delta = 1e-5;
  double epsilon = 0; // of this run alone, at delta

  nlohmann::json to_json() const;
  // Reads what to_json writes; Error naming `what` and the field for anything else (a value
  // out of range included). `epsilon` is recomputed by `accountant`, not read.
  static DpSgdReport from_json(const nlohmann::json& j, const std::string& what, Accountant accountant);
  // The run's contribution to an account.
  void add_to(PrivacyAccount& account) const { account.add(sample_rate, noise_multiplier, steps); }
};

// The report of a run of `steps` steps with `dp` on `samples` examples in batches of
// `batch_size`, its ε by dp.accountant. UsageError (naming --batch-size) if batch_size > samples:
// the sampling rate would exceed 1.
DpSgdReport dp_sgd_report(const DpSgdConfig& dp, std::uint64_t samples, std::uint32_t batch_size, std::uint64_t steps);

// Client-level DP of one round (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
// Recurrent Language Models"): one Gaussian mechanism at the rate sites were sampled.
// Amplification by sampling assumes nobody can tell who was sampled: it is taken only for a
// selection drawn in secret (from the OS's CSPRNG at the coordinator); a selection anyone with
// the seed can repeat is accounted at rate 1.
struct ClientDpRound
{
  double clip_norm = 0;
  double noise_multiplier = 0;
  double sample_rate = 1; // the rate accounted: asked / connected for a secret selection, else 1
  double delta = 1e-5;
  // "all" (every connected site asked), "secret" or "seeded" (serve --seed: reproducible).
  std::string selection = "all";
};

// What the ledger says one site spent with DP-SGD, as the welcome frame carries it:
// {"mechanisms", "runs"}.
struct SiteSpending
{
  PrivacyAccount spent;
  std::uint64_t runs = 0; // DP-SGD runs

  nlohmann::json to_json() const;
  // Error naming `what` for anything to_json does not write (a count that is not an unsigned
  // integer included); no "runs" reads as 0.
  static SiteSpending from_json(const nlohmann::json& j, const std::string& what);
};

class FederationPrivacy
{
public:
  // Adds the "privacy" object of a round entry's body, if it has one. Its "accountant" says how
  // its ε were computed (none: "rdp-v1"); VerifyError for a name this fedl does not know, or for
  // a change of accountant that the round does not record ("accountant_changed_from").
  // With `verify`, checks that every ε it records equals the one recomputed from the recorded
  // parameters and the rounds before (relative 1e-9) and is within the budget it records, and
  // throws VerifyError naming the round (and site) if not. By the PLD accountant, which costs
  // milliseconds per ε, an account's ε is recomputed at its 1st, 8th, 64th, 512th ... round and,
  // in finish_verify(), its last; the rounds between must not record less than the last
  // recomputed value nor more than the budget.
  void replay(const nlohmann::json& round_body, bool verify);
  // After the last replay(…, true): recomputes each account's last recorded ε that replay did
  // not. VerifyError as replay's.
  void finish_verify();

  // The "privacy" object of a new round, with each ε the total after it by `accountant`, and
  // adds the round. Null if there is nothing to record (no client-level DP, no site reports, no
  // budget).
  nlohmann::json record_round(const std::optional<ClientDpRound>& client,
                              const std::map<std::string, DpSgdReport>& sites, std::optional<double> max_epsilon,
                              Accountant accountant);

  // The federation's client-level account.
  const PrivacyAccount& client() const noexcept { return m_client.spent; }
  // The accountant of the last round that recorded privacy (nullopt if none did).
  std::optional<Accountant> accountant() const noexcept { return m_accountant; }
  // What the ledger says `site` spent, for the welcome frame (SiteSpending::to_json); null if it
  // spent nothing.
  nlohmann::json site_report(const std::string& name) const;
  // Rounds with client-level DP so far.
  std::uint64_t client_rounds() const noexcept { return m_client.runs; }

private:
  // One account and what verifying its recorded totals has established so far.
  struct Account
  {
    PrivacyAccount spent;
    std::uint64_t runs = 0;
    double floor = 0; // the last recomputed total, at floor_delta by floor_accountant
    double floor_delta = 0;
    Accountant floor_accountant = Accountant::rdp_v1;
    struct Pending
    {
      double recorded;
      double delta;
      Accountant accountant;
      std::optional<double> max_epsilon;
      std::string what;
    };
    std::optional<Pending> pending; // the last recorded total, not yet recomputed
  };
  void verify_total(Account& account, double recorded, double delta, Accountant a, std::optional<double> max_epsilon,
                    const std::string& what);

  Account m_client;
  std::map<std::string, Account> m_sites;
  std::optional<Accountant> m_accountant;
};

// A restart of fedl serve must not quietly weaken what the rounds so far promised. `last_dp` is the
// "privacy" object of the last round with client-level DP (null if none had it), `rounds` the
// rounds so far. Throws UsageError naming the flags if `now` has less noise, a larger clip, or
// drops or raises the budget that round recorded.
void check_not_weaker(const nlohmann::json& last_dp, const PrivacyConfig& now, std::uint64_t rounds);

// For a round's line in serve's progress and the audit: ", epsilon E[ of MAX]" (the federation's
// client-level total after the round) and ", site epsilon up to S" (the largest site total), from
// a round entry's body; empty without "privacy".
std::string round_privacy_text(const nlohmann::json& round_body);
// A round entry's client-level epsilon (privacy.client.epsilon), if it records one.
std::optional<double> round_client_epsilon(const nlohmann::json& round_body);

// A site's own account of its sample-level spending (DIR/privacy.jsonl).
class SiteAccount
{
public:
  // Reads and verifies `path` against `identity`'s certificate. A missing file is an empty
  // account (existed() false). VerifyError (exit 3) naming the file and line if a line was
  // altered, removed or not signed by this site.
  static SiteAccount open(const std::filesystem::path& path, const Identity& identity);

  bool existed() const noexcept { return m_existed; }
  const PrivacyAccount& spent() const noexcept { return m_spent; }
  std::uint64_t runs() const noexcept { return m_runs; }

  // Appends one run (a "spent" entry, signed, fsync'ed), creating the file with a "genesis"
  // entry that names the site first. Call it
  // before the update leaves the site: a crash then over-counts, never under-counts.
  // Its "total_epsilon" is computed, and its "accountant" named, by `accountant`.
  void append(const DpSgdReport& report, const nlohmann::json& context, Accountant accountant);

private:
  SiteAccount(std::filesystem::path path, const Identity& identity) : m_path(std::move(path)), m_identity(&identity) {}
  std::filesystem::path m_path;
  const Identity* m_identity;
  PrivacyAccount m_spent;
  std::uint64_t m_runs = 0;
  bool m_existed = false;
};

} // namespace fedl::core
