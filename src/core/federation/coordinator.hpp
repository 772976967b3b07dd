// SPDX-License-Identifier: Apache-2.0
// The coordinator behind `fedl serve` (DESIGN §4): accepts sites over mutual TLS 1.3, drives
// rounds (seeded sampling, deadlines, quorum, retries), receives updates to files, validates and
// aggregates them exactly as `fedl aggregate --workspace` does, writes each round's model and
// signed ledger entry before the next round starts, and resumes from the ledger after a crash.
//
// Threads: one runs Asio (all sockets, timers, the round state machine); one more runs each
// round's validation, aggregation, evaluation and ledger append, so heartbeats keep flowing
// while a large model is aggregated.
#pragma once

#include "core/config/config.hpp"
#include "core/math/aggregate.hpp"
#include "core/net/tls.hpp"
#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <optional>

namespace fedl::core {

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
  std::optional<std::filesystem::path> eval_data;
  std::optional<double> target_accuracy;
  std::optional<HostPort> metrics;
  std::uint64_t seed = 0;
  double heartbeat = 5;   // seconds between heartbeats on a quiet connection
  double dead_after = 20; // a peer silent this long is dropped
  double settle = 1;      // seconds to wait for more sites once a quorum is connected

  // The effective settings, as the ledger records them.
  nlohmann::json to_json() const;
};

// Evaluates a model file (on the workspace's held-out data); returns {"accuracy", "loss",
// "samples", ...}. Runs on the round thread.
using Evaluator = std::function<nlohmann::json(const std::filesystem::path& model)>;

// Runs the federation until round `settings.rounds` is done, the target accuracy is reached,
// the privacy budget allows no further round (reason "privacy-budget"), or SIGINT/SIGTERM;
// returns the summary (`"interrupted": true` in the last case). Throws Error
// for failures that stop the coordinator (cannot listen, disk full, no quorum in wait_timeout).
nlohmann::json run_coordinator(const Workspace& ws, const ServeSettings& settings, const Evaluator& evaluate);

} // namespace fedl::core
