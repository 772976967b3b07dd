// SPDX-License-Identifier: Apache-2.0
// Privacy accounting across rounds (core/math/accountant.hpp does one mechanism):
//
//   RdpAccount         the Rényi DP curve of everything spent so far at default_orders(); RDP
//                      composes by adding curves (Mironov 2017, Proposition 1), so a federation
//                      or a site keeps one curve and converts it to (ε, δ) when asked.
//   DpSgdReport        what a site says about one DP-SGD training run (q, σ, steps, δ, ε): the
//                      update's fedl.dp metadata, signed with the update.
//   FederationPrivacy  the federation's account, replayed from the ledger's "round" entries:
//                      client-level DP (one Gaussian step per round at the client sampling rate)
//                      and each site's sample-level DP-SGD runs. The coordinator records each
//                      round with it, and `fedl audit` recomputes every recorded ε with it.
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

class RdpAccount
{
public:
  RdpAccount();

  // Adds `steps` steps of the sampled Gaussian mechanism (rate q, noise multiplier σ).
  void add(double q, double sigma, std::uint64_t steps);
  // Makes each order's value the larger of this account's and `other`'s (both bound the loss).
  void merge_max(const RdpAccount& other);
  // ε at `delta` (0 for an empty account).
  PrivacySpent epsilon(double delta) const;
  bool empty() const noexcept { return !m_any; }

  // {"orders": [...], "rdp": [...]}, and back: Error naming `what` unless the orders are
  // default_orders() and every value is finite and not negative.
  nlohmann::json to_json() const;
  static RdpAccount from_json(const nlohmann::json& j, const std::string& what);

private:
  std::vector<double> m_rdp;
  bool m_any = false;
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
  // out of range included). `epsilon` is recomputed, not read.
  static DpSgdReport from_json(const nlohmann::json& j, const std::string& what);
  // The run's contribution to an account.
  void add_to(RdpAccount& account) const { account.add(sample_rate, noise_multiplier, steps); }
};

// The report of a run of `steps` steps with `dp` on `samples` examples in batches of
// `batch_size`. UsageError (naming --batch-size) if batch_size > samples: the sampling rate
// would exceed 1.
DpSgdReport dp_sgd_report(const DpSgdConfig& dp, std::uint64_t samples, std::uint32_t batch_size, std::uint64_t steps);

// Client-level DP of one round (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
// Recurrent Language Models"): one Gaussian mechanism at the rate sites were sampled.
struct ClientDpRound
{
  double clip_norm = 0;
  double noise_multiplier = 0;
  double sample_rate = 1; // sites asked / sites connected
  double delta = 1e-5;
};

// What the ledger says one site spent with DP-SGD, as the welcome frame carries it:
// {"orders", "rdp", "runs"}.
struct SiteSpending
{
  RdpAccount rdp;
  std::uint64_t runs = 0; // DP-SGD runs

  nlohmann::json to_json() const;
  // Error naming `what` for anything to_json does not write (a count that is not an unsigned
  // integer included); no "runs" reads as 0.
  static SiteSpending from_json(const nlohmann::json& j, const std::string& what);
};

class FederationPrivacy
{
public:
  // Adds the "privacy" object of a round entry's body, if it has one. With `verify`, first
  // checks that every ε it records equals the one recomputed from the recorded parameters and
  // the rounds before (relative 1e-9), and throws VerifyError naming the round (and site) if not.
  void replay(const nlohmann::json& round_body, bool verify);

  // The "privacy" object of a new round, with each ε the total after it, and adds the round.
  // Null if there is nothing to record (no client-level DP, no site reports, no budget).
  nlohmann::json record_round(const std::optional<ClientDpRound>& client,
                              const std::map<std::string, DpSgdReport>& sites, std::optional<double> max_epsilon);

  // The federation's client-level account.
  const RdpAccount& client() const noexcept { return m_client; }
  // What the ledger says `site` spent, for the welcome frame (SiteSpending::to_json); null if it
  // spent nothing.
  nlohmann::json site_report(const std::string& name) const;
  // Rounds with client-level DP so far.
  std::uint64_t client_rounds() const noexcept { return m_client_rounds; }

private:
  RdpAccount m_client;
  std::uint64_t m_client_rounds = 0;
  struct Site
  {
    RdpAccount rdp;
    std::uint64_t runs = 0;
  };
  std::map<std::string, Site> m_sites;
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

// A site's own account of its sample-level spending (DIR/privacy.jsonl).
class SiteAccount
{
public:
  // Reads and verifies `path` against `identity`'s certificate. A missing file is an empty
  // account (existed() false). VerifyError (exit 3) naming the file and line if a line was
  // altered, removed or not signed by this site.
  static SiteAccount open(const std::filesystem::path& path, const Identity& identity);

  bool existed() const noexcept { return m_existed; }
  const RdpAccount& spent() const noexcept { return m_spent; }
  std::uint64_t runs() const noexcept { return m_runs; }

  // Appends one run (a "spent" entry, signed, fsync'ed), creating the file with a "genesis"
  // entry that names the site first. Call it
  // before the update leaves the site: a crash then over-counts, never under-counts.
  void append(const DpSgdReport& report, const nlohmann::json& context);

private:
  SiteAccount(std::filesystem::path path, const Identity& identity) : m_path(std::move(path)), m_identity(&identity) {}
  std::filesystem::path m_path;
  const Identity* m_identity;
  RdpAccount m_spent;
  std::uint64_t m_runs = 0;
  bool m_existed = false;
};

} // namespace fedl::core
