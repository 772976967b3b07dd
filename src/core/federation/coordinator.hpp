// SPDX-License-Identifier: Apache-2.0
// The coordinator behind `fedl serve` (DESIGN §4): accepts sites over mutual TLS 1.3, drives
// rounds (seeded sampling, deadlines, quorum, retries), receives updates to files, validates and
// aggregates them exactly as `fedl aggregate --workspace` does, writes each round's model and
// signed ledger entry before the next round starts, and resumes from the ledger after a crash.
//
// The round state machine is RoundMachine (round_machine.hpp); this is the sockets, files and
// threads around it. Threads: one runs Asio (all sockets, timers, the machine); one more runs each
// round's validation, aggregation, evaluation and ledger append, so heartbeats keep flowing
// while a large model is aggregated.
#pragma once

#include "core/federation/serve_settings.hpp"
#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>

namespace fedl::core {

// Evaluates a model file (on the workspace's held-out data); returns {"accuracy", "loss",
// "samples", ...}. Runs on the round thread.
using Evaluator = std::function<nlohmann::json(const std::filesystem::path& model)>;

// Runs the federation until round `settings.rounds` is done, the target accuracy is reached,
// the privacy budget allows no further round (reason "privacy-budget"), or SIGINT/SIGTERM;
// returns the summary (`"interrupted": true` in the last case). Throws Error
// for failures that stop the coordinator (cannot listen, disk full, no quorum in wait_timeout).
nlohmann::json run_coordinator(const Workspace& ws, const ServeSettings& settings, const Evaluator& evaluate);

} // namespace fedl::core
