// SPDX-License-Identifier: Apache-2.0
// The site behind `fedl join` (DESIGN §4): a small, torch-free network process that connects to
// the coordinator with its client bundle, reconnects by itself (jittered exponential backoff,
// capped), hands each task to the trainer child over a pipe, signs the update with the site's key
// and sends it back. The trainer never touches the network; the session never runs LibTorch.
#pragma once

#include "core/net/child.hpp"
#include "core/net/tls.hpp"
#include "core/trust/contract.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedl::core {

struct JoinSettings
{
  std::filesystem::path bundle; // clients/NAME from fedl init
  HostPort server;
  std::string server_name;                  // the name the coordinator's certificate must carry
  std::vector<std::string> trainer_argv;    // the trainer child: fedl __worker --data ...
  std::optional<ForkServerRef> fork_server; // start it through this fork server (join --fork-server)
  double retry_initial = 0.5;               // first reconnect delay, seconds
  double retry_max = 30;                    // cap of the reconnect delay
  double retry_for = 0;                     // give up after this long without a connection; 0: never
  double trainer_idle = 0;                  // stop the trainer after this long without a task; 0: keep it
  // Stop (exit 1) once the trainer has failed this many tasks in a row with the same error (bad
  // data, a device that is not there): retrying would fail the same way. 0: never.
  std::uint32_t max_failures = 3;
  // The largest task body accepted (the contract's max_model_bytes when there is one).
  std::uint64_t max_model_bytes = std::uint64_t{16} << 30;
  // The bundle's contract (join.json, signed by the CA); none for a bundle of an older fedl. A
  // task outside it, or outside the site's own tightening below, is refused before anything is
  // allocated or trained, and the coordinator is told only the reason class.
  std::optional<SiteContract> contract;
  std::optional<std::uint32_t> max_epochs;         // --max-epochs
  std::optional<double> min_noise_multiplier;      // --min-noise-multiplier
  bool require_secure_aggregation = false;         // --require-secure-aggregation: no update in clear
  SandboxLevel sandbox = SandboxLevel::automatic;  // --sandbox: told to the coordinator with each update
  ModelPolicy model_policy = ModelPolicy::inspect; // --model-policy: told to the coordinator likewise
  // The site's own privacy budget (--max-epsilon, --delta): kept in bundle/privacy.jsonl; a task
  // whose DP-SGD would take the account past it is refused (the coordinator is told why) and
  // the site stops with exit 4.
  std::optional<double> max_epsilon;
  double delta = 1e-5;
  // How the site computes its ε (join --accountant); its privacy.jsonl records it with each run.
  Accountant accountant = Accountant::pld_v1;
};

// Runs the site until the coordinator says the federation is finished (returns the summary),
// SIGINT/SIGTERM (the summary has "interrupted": true), or a failure that retrying cannot fix:
// the coordinator refuses this site's certificate or presents a wrong one (VerifyError, exit 3),
// or --retry-for ran out (Error, exit 1). With a budget: the account file was altered, or deleted
// while the coordinator's ledger records spending (VerifyError, exit 3); the budget is spent or a
// task would overspend it (Error, exit 4).
nlohmann::json run_site(const JoinSettings& settings);

} // namespace fedl::core
