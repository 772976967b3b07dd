// SPDX-License-Identifier: Apache-2.0
// fedl aggregate: combine update files into the next global model with a strategy; with
// --workspace, check each update's site signature against the federation's CA and CRL, write
// models/global-NNNNNN.safetensors and append a signed ledger entry for the round. The round
// itself is core/federation/round.hpp, shared with fedl serve; this file is its command line.
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "core/config/config.hpp"
#include "core/federation/round.hpp"
#include "core/math/aggregate.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/error.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <optional>
#include <vector>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct AggregateOptions
{
  std::optional<fs::path> base;
  std::optional<fs::path> out;
  std::optional<fs::path> workspace;
  std::optional<std::string> strategy;
  std::optional<fs::path> state;
  std::optional<double> clip_norm;
  std::optional<double> server_lr, server_momentum, beta1, beta2, tau;
  std::string on_bad_update = "fail";
  std::vector<fs::path> updates;
};

core::ServerOptions
server_options(const AggregateOptions& opt, const core::FederationConfig* config)
{
  auto o = config != nullptr ? core::configured_server_options(*config) : core::ServerOptions{};
  auto& s = o.optimizer;
  s.lr = opt.server_lr.value_or(s.lr);
  s.momentum = opt.server_momentum.value_or(s.momentum);
  s.beta1 = opt.beta1.value_or(s.beta1);
  s.beta2 = opt.beta2.value_or(s.beta2);
  s.tau = opt.tau.value_or(s.tau);
  o.clip_norm = opt.clip_norm;
  core::validate_server_options(o);
  return o;
}

int
run_aggregate(const AggregateOptions& opt)
{
  std::optional<core::FederationConfig> config;
  std::optional<core::WorkspaceLock> serving;
  std::optional<core::WorkspaceLock> lock;
  core::RoundPlan plan;
  if (opt.workspace) {
    const core::Workspace ws(*opt.workspace);
    ws.require_exists();
    config = core::load_config(ws.config());
    if (opt.out || opt.state) {
      throw core::UsageError("with --workspace the new model goes to models/ and the server state to state/; "
                             "--out and --state are for aggregating outside a workspace");
    }
    // A live coordinator writes this workspace's rounds itself: a round aggregated beside it
    // would stop it at its next one.
    serving.emplace(ws, core::WorkspaceLock::Kind::serve);
    lock.emplace(ws);
    plan = core::plan_workspace_round(ws);
    // Client-level DP (noise on the aggregate, a budget on it) is fedl serve's: a round made here
    // would be released without the noise or the budget the federation promises.
    if (config->privacy.noise_multiplier > 0 || config->privacy.max_epsilon > 0 || plan.privacy.client_rounds() > 0) {
      throw core::UsageError(
        "this federation uses client-level DP (fedl.json privacy, or rounds that recorded it): its "
        "rounds are made by fedl serve, which adds the noise and keeps the budget; fedl aggregate "
        "--workspace does neither");
    }
    if (opt.base && fs::weakly_canonical(*opt.base) != fs::weakly_canonical(plan.base)) {
      throw core::UsageError("--base {} is not the workspace's latest model {}; leave --base out", opt.base->string(),
                             plan.base.string());
    }
  } else {
    if (!opt.base || !opt.out) {
      throw core::UsageError("give --base MODEL and --out MODEL, or --workspace WS");
    }
    plan = core::plan_standalone_round(*opt.base, *opt.out, opt.state);
    plan.record_digests = globals().json; // only the JSON result lists the updates' hashes
  }
  core::RoundSettings settings;
  settings.strategy = core::parse_strategy(opt.strategy.value_or(config ? config->strategy : "fedavg"));
  settings.options = server_options(opt, config ? &*config : nullptr);
  if (config) {
    settings.accountant = config->privacy.accountant;
  }

  std::vector<core::RoundCandidate> candidates;
  for (const auto& path : opt.updates) {
    candidates.push_back({path, {}});
  }
  const auto on_bad = opt.on_bad_update == "skip" ? core::OnBadUpdate::skip : core::OnBadUpdate::fail;
  core::RoundResult r;
  try {
    auto validated = core::validate_round(plan, candidates, on_bad);
    r = core::commit_round(validated, settings);
  } catch (const core::BadUpdateError& e) {
    throw core::VerifyError("{} (give --on-bad-update skip to leave bad updates out)", e.what());
  }

  // As serve and audit name a workspace's models: relative to the workspace, beside it.
  nlohmann::json j = {{"model", r.model.string()},
                      {"model_sha256", r.sha256},
                      {"strategy", r.strategy},
                      {"participants", r.participants},
                      {"rejected", r.rejected}};
  if (!r.info.selected.empty()) {
    j["selected"] = r.info.selected;
  }
  if (plan.workspace) {
    j["round"] = r.round;
    j["workspace"] = opt.workspace->string();
    j["model"] = core::Workspace::model_name(r.round);
  }
  print_result(j, fmt::format("{}{} from {} updates ({} left out) with {}: {}\n",
                              plan.workspace ? fmt::format("round {}: ", r.round) : "", r.model.string(),
                              r.participants.size(), r.rejected.size(), r.strategy, r.sha256));
  return 0;
}

} // namespace

Command
add_aggregate(CLI::App& parent)
{
  auto opt = std::make_shared<AggregateOptions>();
  auto* app = parent.add_subcommand("aggregate", "Combine update files into the next global model");
  app->add_option("updates", opt->updates, "Update files (safetensors from fedl train --out)")
    ->required()
    ->type_name("UPDATE");
  app->add_option("--base", opt->base, "The model the updates were trained from (default with --workspace: the latest)")
    ->type_name("FILE");
  app->add_option("--out", opt->out, "Where to write the new model (not with --workspace)")->type_name("FILE");
  app->add_option("--workspace", opt->workspace, "Aggregate a round of this workspace: signed updates, ledger entry")
    ->type_name("DIR");
  with_suggestions(app->add_option("--strategy", opt->strategy,
                                   "fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean:BETA, krum:F, "
                                   "multi-krum:F,M"),
                   strategy_suggestions())
    ->type_name("S");
  app->add_option("--state", opt->state, "Server optimizer state file, read and rewritten (not with --workspace)")
    ->type_name("FILE");
  app->add_option("--clip-norm", opt->clip_norm, "Scale each update down to this L2 norm first")
    ->check(CLI::PositiveNumber)
    ->type_name("C");
  app->add_option("--server-lr", opt->server_lr, "Server learning rate (default 1, or fedl.json)")->type_name("LR");
  app->add_option("--server-momentum", opt->server_momentum, "fedavgm momentum (default 0.9)")->type_name("M");
  app->add_option("--beta1", opt->beta1, "First-moment decay of fedadam/fedyogi/fedadagrad (default 0.9)")
    ->type_name("B1");
  app->add_option("--beta2", opt->beta2, "Second-moment decay of fedadam/fedyogi (default 0.99)")->type_name("B2");
  app->add_option("--tau", opt->tau, "Adaptivity of fedadam/fedyogi/fedadagrad (default 1e-3)")->type_name("TAU");
  with_choices(app->add_option("--on-bad-update", opt->on_bad_update, "Fail on a bad update, or skip it and report it")
                 ->capture_default_str(),
               {"fail", "skip"});
  return {app, [opt] { return run_aggregate(*opt); }};
}

} // namespace fedl::cmd
