// SPDX-License-Identifier: Apache-2.0
// The settings of `fedl serve` (fedl.json's, with the command line's on top), as the coordinator
// and its round state machine use them and the ledger's "serve" entry records them.
#pragma once

#include "core/config/config.hpp"
#include "core/federation/best_model.hpp"
#include "core/math/aggregate.hpp"
#include "core/net/tls.hpp"
#include "core/sandbox/sandbox.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string_view>

namespace fedl::core {

// What secure aggregation `s` cannot go with in any federation, UsageError saying why: a strategy
// that needs each update, distributed DP without client-level DP (`client_dp_flags` names how to
// set it).
void check_secure_fits(const SecureAggregationConfig& s, const StrategySpec& strategy, const PrivacyConfig& privacy,
                       std::string_view client_dp_flags);

struct ServeSettings
{
  HostPort listen;
  std::uint32_t rounds = 10;           // the federation ends after round `rounds`
  std::uint32_t min_clients = 2;       // quorum: accepted updates a round needs
  std::uint32_t clients_per_round = 0; // sites asked per round; 0: see fraction
  double fraction = 0;                 // share of connected sites asked; 0 (and no count): all
  double round_timeout = 600;          // seconds from sending the tasks to aggregating
  double wait_timeout = 0;             // seconds to wait for a quorum to connect; 0: forever
  StrategySpec strategy;
  ServerOptions server;
  TrainingConfig training;
  // Client-level DP (clip_norm, noise_multiplier) and the federation's budget (max_epsilon at
  // delta, on the client-level epsilon): a round whose sampling would take the federation past
  // it is not started; the coordinator records "finished" with reason "privacy-budget" instead.
  PrivacyConfig privacy;
  // Secure aggregation (SecAgg+): the coordinator sees only the sum of each round's updates.
  std::optional<SecureAggregationConfig> secure_aggregation;
  // fedl.json limits.max_num_samples: under secure aggregation, the sample count at which a
  // site's weight is 1 (a site with n samples weighs min(n, this) / this).
  std::uint64_t max_num_samples = LimitsConfig::default_max_num_samples;
  std::optional<std::filesystem::path> eval_data;
  // The model's classes (fedl.json): a site's confusion matrix of another size is left out.
  std::int64_t classes = 0;
  // With eval_data: the metric that picks models/best.safetensors (core/federation/best_model.hpp).
  std::optional<BestMetric> best_metric;
  std::optional<double> target_accuracy;
  std::optional<HostPort> metrics;
  // --require-sandbox: updates from sites whose trainer ran with a weaker --sandbox (as the site
  // says) are refused, the site dropped from the round.
  std::optional<SandboxLevel> require_sandbox;
  std::uint64_t seed = 0;
  // serve --seed: participants drawn from the seed (reproducible, and known to every site, whose
  // training seed derives from it), so client-level DP is accounted without amplification by
  // sampling; otherwise they are drawn from the OS's CSPRNG, in secret.
  bool seeded_selection = false;
  double heartbeat = 5;   // seconds between heartbeats on a quiet connection
  double dead_after = 20; // a peer silent this long is dropped
  double settle = 1;      // seconds to wait for more sites once a quorum is connected
  // A site whose tasks failed this many times in a row (error reports, not silence) sits out the
  // rest of this run, until it connects anew; 0: never.
  std::uint32_t max_site_failures = 3;

  // The effective settings, as the ledger records them.
  nlohmann::json to_json() const;
  // Why an update from a site that says its trainer ran at `level` (nothing: an older fedl) is
  // refused under require_sandbox; nothing if it is not.
  std::optional<std::string> sandbox_refusal(std::optional<SandboxLevel> level) const;
  // With secure aggregation: UsageError (exit 2) saying why for what it cannot go with: a
  // strategy that needs each update, a clip at the coordinator, a quorum below 3 sites, rounds
  // that would ask more than SecureAggregationConfig::max_sites of the `enrolled` sites.
  void check_secure_aggregation(std::size_t enrolled) const;
};

} // namespace fedl::core
