// SPDX-License-Identifier: Apache-2.0
// fedl serve: the coordinator. Options and their defaults from fedl.json; the work is in
// core/coordinator. Model evaluation runs in a child process (fedl __worker), so that this
// process never loads LibTorch.
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "core/federation/coordinator.hpp"
#include "core/federation/round.hpp"
#include "core/federation/serve_settings.hpp"
#include "core/net/child.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <mutex>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct ServeOptions
{
  fs::path workspace;
  std::optional<std::string> listen;
  std::optional<std::uint32_t> rounds;
  std::optional<std::uint32_t> min_clients;
  std::optional<std::uint32_t> clients_per_round;
  std::optional<double> fraction;
  std::optional<double> round_timeout;
  std::optional<double> wait_timeout;
  std::optional<std::string> strategy;
  std::optional<double> clip_norm;
  std::optional<double> dp_clip_norm;
  std::optional<double> dp_noise_multiplier;
  std::optional<double> max_epsilon;
  std::optional<std::string> accountant;
  std::optional<double> delta;
  SecureAggregationFlags secure;
  std::optional<fs::path> eval_data;
  std::string metrics_set = "basic";
  std::optional<std::string> best_metric;
  DataFlags eval_format; // how --eval-data is laid out, where fedl.json has no data contract
  std::optional<double> target_accuracy;
  std::uint32_t max_site_failures = core::ServeSettings{}.max_site_failures;
  std::optional<std::string> require_sandbox;
  std::optional<std::string> metrics;
  std::optional<std::uint64_t> seed;
  double heartbeat = 5;
  ComputeOptions compute;
};

// The held-out data `fedl init --holdout` wrote, if any.
std::optional<fs::path>
default_eval_data(const core::Workspace& ws)
{
  for (const char* name : {"test.csv", "test-images-idx3-ubyte.gz"}) {
    if (fs::exists(ws.data() / name)) {
      return ws.data() / name;
    }
  }
  return std::nullopt;
}

// The most classes whose figures a round entry lists one by one (--metrics-set classification):
// past it, only the means.
constexpr std::int64_t max_ledger_classes = 100;

// Evaluates each new model in a long-lived `fedl __worker` child, started at the first round.
// A failed evaluation is logged and recorded, never fatal to the federation.
class ChildEvaluator
{
public:
  explicit ChildEvaluator(std::vector<std::string> argv) : m_trainer(std::move(argv)) {}

  nlohmann::json operator()(const fs::path& model)
  {
    const std::lock_guard lock(m_mutex);
    try {
      const core::MappedFile file(model);
      const auto answer = m_trainer.evaluate(file.bytes());
      if (const auto* e = std::get_if<core::ChildError>(&answer)) {
        throw core::Error("{}", e->message);
      }
      const auto& result = std::get<core::EvalResult>(answer);
      auto j = result.summary(max_ledger_classes);
      j["seconds"] = result.seconds;
      return j;
    } catch (const std::exception& e) {
      FEDL_LOG_WARN("evaluating {} failed: {}", model.string(), e.what());
      m_trainer.kill();
      return {{"error", e.what()}};
    }
  }

private:
  core::TrainerClient m_trainer;
  std::mutex m_mutex;
};

// Client-level DP and the budget: fedl.json's "privacy", each value replaced by its flag.
core::PrivacyConfig
privacy_settings(const ServeOptions& opt, core::PrivacyConfig p)
{
  if (opt.dp_clip_norm.has_value() != opt.dp_noise_multiplier.has_value()) {
    throw core::UsageError("client-level DP needs both --dp-clip-norm C and --dp-noise-multiplier S");
  }
  if (opt.dp_clip_norm) {
    p.clip_norm = *opt.dp_clip_norm;
    p.noise_multiplier = *opt.dp_noise_multiplier;
  }
  p.max_epsilon = opt.max_epsilon.value_or(p.max_epsilon);
  p.delta = opt.delta.value_or(p.delta);
  p.accountant = resolve_accountant(opt.accountant).value_or(p.accountant);
  // fedl.json's values were checked where it was read: what fails here came from a flag.
  core::check_privacy(p, {"--dp-clip-norm", "--dp-noise-multiplier", "--max-epsilon", "--delta"});
  return p;
}

// The coordinator's settings: fedl.json's, with the flags on top; UsageError naming the flag for
// a value out of range or settings that contradict each other.
core::ServeSettings
serve_settings(const ServeOptions& opt, const core::Workspace& ws, const core::FederationConfig& config)
{
  core::ServeSettings s;
  s.listen =
    core::parse_host_port(opt.listen.value_or(config.listen), opt.listen ? "--listen" : "fedl.json server.listen");
  s.rounds = opt.rounds.value_or(config.rounds);
  const std::uint32_t default_quorum = config.clients.size() <= 1 ? 1 : 2;
  s.min_clients = opt.min_clients.value_or(config.min_clients > 0 ? config.min_clients : default_quorum);
  s.clients_per_round = opt.clients_per_round.value_or(config.clients_per_round);
  s.fraction = opt.fraction.value_or(0);
  s.round_timeout = opt.round_timeout.value_or(config.round_timeout);
  s.wait_timeout = opt.wait_timeout.value_or(config.wait_timeout);
  s.strategy = core::parse_strategy(opt.strategy.value_or(config.strategy));
  s.server = core::configured_server_options(config);
  s.server.clip_norm = opt.clip_norm;
  core::validate_server_options(s.server);
  s.training = config.training;
  s.privacy = privacy_settings(opt, config.privacy);
  if (s.privacy.noise_multiplier > 0 && !s.strategy.mean_type()) {
    throw core::UsageError("client-level DP adds noise to a mean, so it needs a mean-type strategy (fedavg, fedavgm, "
                           "fedadam, fedyogi, fedadagrad), not {}",
                           s.strategy.to_string());
  }
  s.secure_aggregation = opt.secure.resolve(config.secure_aggregation);
  s.max_num_samples = config.limits.max_num_samples;
  if (s.min_clients > config.clients.size()) {
    FEDL_LOG_WARN("--min-clients {} is more than the {} sites of this federation: no round can start until sites are "
                  "added (fedl init {} --add-client NAME)",
                  s.min_clients, config.clients.size(), ws.root().string());
  }
  s.target_accuracy = opt.target_accuracy;
  if (opt.require_sandbox) {
    s.require_sandbox = core::parse_sandbox_level(*opt.require_sandbox, "--require-sandbox");
  }
  s.seed = opt.seed.value_or(config.seed);
  s.seeded_selection = opt.seed.has_value();
  s.heartbeat = opt.heartbeat;
  s.max_site_failures = opt.max_site_failures;
  s.dead_after = 4 * opt.heartbeat;
  if (opt.metrics) {
    s.metrics = core::parse_host_port(*opt.metrics, "--metrics");
  }
  if (s.min_clients < 1) {
    throw core::UsageError("--min-clients must be at least 1");
  }
  if (s.clients_per_round > 0 && s.clients_per_round < s.min_clients) {
    throw core::UsageError("--clients-per-round {} is below --min-clients {}: no round could reach its quorum",
                           s.clients_per_round, s.min_clients);
  }
  s.check_secure_aggregation(config.clients.size());
  s.classes = config.model.classes;
  s.eval_data = opt.eval_data ? opt.eval_data : default_eval_data(ws);
  if (opt.target_accuracy && !s.eval_data) {
    throw core::UsageError("--target-accuracy needs evaluation data: give --eval-data PATH (or init with --holdout)");
  }
  if (s.eval_data && !fs::exists(*s.eval_data)) {
    throw core::Error("--eval-data {}: no such file", s.eval_data->string());
  }
  if (opt.best_metric && !s.eval_data) {
    throw core::UsageError("--best-metric picks the best model by its evaluation, but there is no evaluation data: "
                           "give --eval-data PATH (or init with --holdout)");
  }
  if (s.eval_data) {
    s.best_metric = core::parse_best_metric(opt.best_metric.value_or("accuracy"));
    if (!s.best_metric) {
      throw core::UsageError("--best-metric {}: not a metric (one of {})", *opt.best_metric, core::best_metric_names());
    }
    if (s.best_metric->name != "accuracy" && s.best_metric->name != "loss" && opt.metrics_set == "basic") {
      throw core::UsageError("--best-metric {} is measured with --metrics-set classification", s.best_metric->name);
    }
  }

  return s;
}

// The evaluator child: fedl __worker on the held-out data, with this workspace's model.
std::vector<std::string>
evaluator_argv(const ServeOptions& opt, const core::Workspace& ws, const core::FederationConfig& config,
               const DataFlags& eval_data)
{
  // The evaluator gets this workspace's own models: as large as the model file may grow.
  const auto model_bytes = fs::file_size(ws.model(0)) * 2 + (std::uint64_t{4} << 20);
  std::vector<std::string> argv{
    core::self_executable().string(), "__worker", "--log-format", globals().log_format, "--max-model-bytes",
    std::to_string(model_bytes),      "--role",   "the evaluator"};
  const auto data_args = eval_data.to_args();
  argv.insert(argv.end(), data_args.begin(), data_args.end());
  if (config.model.torchscript) {
    argv.insert(argv.end(), {"--torchscript", (ws.root() / *config.model.torchscript).string()});
  }
  if (globals().quiet) {
    argv.push_back("--quiet");
  }
  argv.insert(argv.end(), {"--device", opt.compute.device, "--metrics-set", opt.metrics_set});
  if (opt.compute.threads > 0) {
    argv.insert(argv.end(), {"--threads", std::to_string(opt.compute.threads)});
  }
  return argv;
}

// The summary's line for a person.
std::string
summary_text(const nlohmann::json& summary)
{
  std::string text;
  const auto reason = summary.value("reason", std::string());
  const auto acc = summary["accuracy"].is_number()
                     ? fmt::format(", accuracy {:.2f}%", summary["accuracy"].get<double>() * 100)
                     : std::string();
  if (reason == "privacy-budget") {
    text = fmt::format("stopped after round {}: the privacy budget allows no further round; latest model {}{}\n",
                       summary["rounds_completed"].get<std::uint64_t>(), summary["model"].get<std::string>(), acc);
  } else if (reason == "already-complete") {
    text = fmt::format("the federation is already complete: {}, latest model {}{}\n",
                       core::count_of(summary["rounds_completed"].get<std::uint64_t>(), "round"),
                       summary["model"].get<std::string>(), acc);
  } else {
    text =
      fmt::format("{} after round {}: ran {} ({} retried), latest model {}{}\n",
                  reason == "interrupted" ? "stopped" : "finished", summary["rounds_completed"].get<std::uint64_t>(),
                  core::count_of(summary["rounds_run"].get<std::uint64_t>(), "round"),
                  summary["retries"].get<std::uint64_t>(), summary["model"].get<std::string>(), acc);
  }
  return text;
}

int
run_serve(const ServeOptions& opt)
{
  const core::Workspace ws(opt.workspace);
  ws.require_exists();
  const auto config = core::load_config(ws.config());
  const auto s = serve_settings(opt, ws, config);
  // One coordinator per workspace, for its whole run.
  const core::WorkspaceLock serving(ws, core::WorkspaceLock::Kind::serve);
  std::optional<ChildEvaluator> evaluator;
  core::Evaluator evaluate;
  if (s.eval_data) {
    // Read as fedl.json's data contract says the federation's data is laid out, and checked
    // against it before round 1: a coordinator whose every evaluation fails would run blind.
    auto flags = opt.eval_format;
    flags.data = *s.eval_data;
    flags = flags.with_contract(config.data, ws.config().string());
    check_data_file(flags, config.data, config.model.input_shape, config.model.classes);
    evaluator.emplace(evaluator_argv(opt, ws, config, flags));
    evaluate = [&evaluator](const fs::path& model) { return (*evaluator)(model); };
  } else if (opt.metrics_set != "basic") {
    throw core::UsageError("--metrics-set {} measures the evaluation of each model, but there is no evaluation data: "
                           "give --eval-data (or fedl init --holdout)",
                           opt.metrics_set);
  }
  const auto summary = core::run_coordinator(ws, s, evaluate);
  print_result(summary, summary_text(summary));
  if (summary.value("reason", std::string()) == "privacy-budget") {
    return static_cast<int>(core::ExitCode::budget);
  }
  return summary.value("interrupted", false) ? static_cast<int>(core::ExitCode::interrupted) : 0;
}

} // namespace

Command
add_serve(CLI::App& parent)
{
  auto opt = std::make_shared<ServeOptions>();
  auto* app = parent.add_subcommand("serve", "Run the coordinator: accept sites over mutual TLS and drive rounds");
  app->add_option("workspace", opt->workspace, "The workspace folder (from fedl init)")->required()->type_name("WS");
  app->add_option("--listen", opt->listen, "Address to listen on (default: fedl.json server.listen)")
    ->type_name("HOST:PORT");
  app->add_option("--rounds", opt->rounds, "Last round of the federation (default: fedl.json rounds)")
    ->check(CLI::Range(1U, 100000000U))
    ->type_name("R");
  app->add_option("--min-clients", opt->min_clients, "Quorum: valid updates a round needs (default 2, or fedl.json)")
    ->check(CLI::Range(1U, 1000000U))
    ->type_name("K");
  auto* per_round = app
                      ->add_option("--clients-per-round", opt->clients_per_round,
                                   "Sites asked per round, sampled with the seed (default: all connected)")
                      ->check(CLI::Range(1U, 1000000U))
                      ->type_name("K");
  app->add_option("--fraction", opt->fraction, "Share of the connected sites asked per round")
    ->check(CLI::Range(0.0, 1.0))
    ->excludes(per_round)
    ->type_name("F");
  app->add_option("--round-timeout", opt->round_timeout, "Seconds a round may take before late updates are dropped")
    ->check(CLI::PositiveNumber)
    ->type_name("SEC");
  app->add_option("--wait-timeout", opt->wait_timeout, "Give up (exit 1) if no quorum connects in this time (0: wait)")
    ->check(CLI::NonNegativeNumber)
    ->type_name("SEC");
  with_suggestions(
    app->add_option("--strategy", opt->strategy, "Aggregation strategy (as fedl aggregate; default: fedl.json)"),
    strategy_suggestions())
    ->type_name("S");
  app->add_option("--clip-norm", opt->clip_norm, "Scale each update down to this L2 norm first")
    ->check(CLI::PositiveNumber)
    ->type_name("C");
  app
    ->add_option("--dp-clip-norm", opt->dp_clip_norm,
                 "Client-level DP: clip each update to this L2 norm (with --dp-noise-multiplier)")
    ->type_name("C");
  app
    ->add_option("--dp-noise-multiplier", opt->dp_noise_multiplier,
                 "Client-level DP: noise standard deviation on the sum of updates, over --dp-clip-norm")
    ->type_name("S");
  app
    ->add_option("--max-epsilon", opt->max_epsilon,
                 "Federation budget: start no round that would take client-level epsilon past this (exit 4)")
    ->type_name("E");
  app->add_option("--delta", opt->delta, "The delta of client-level epsilon (default 1e-5, or fedl.json)")
    ->type_name("D");
  add_accountant_option(*app, opt->accountant,
                        "How this serve's rounds compute epsilon (default: fedl.json's); a change is recorded");
  add_secure_aggregation_options(*app, opt->secure);
  app->add_option("--eval-data", opt->eval_data, "Evaluate each new model on this data (default: WS/data/test.*)")
    ->type_name("PATH");
  add_data_format_options(*app, opt->eval_format);
  add_metrics_set_option(*app, opt->metrics_set, "What each evaluation measures, in the ledger");
  with_choices(app->add_option("--best-metric", opt->best_metric,
                               "The evaluation metric that picks models/best.safetensors (default accuracy)"),
               {"accuracy", "loss", "macro_f1", "weighted_f1", "roc_auc"});
  with_choices(
    app->add_option("--require-sandbox", opt->require_sandbox,
                    "Refuse updates from sites whose trainer ran with a weaker --sandbox (as each site says)"),
    {"strict", "auto"})
    ->type_name("LEVEL");
  app->add_option("--target-accuracy", opt->target_accuracy, "Stop once the evaluated accuracy reaches this")
    ->check(CLI::Range(0.0, 1.0))
    ->type_name("A");
  app->add_option("--metrics", opt->metrics, "Serve Prometheus metrics over HTTP here")->type_name("HOST:PORT");
  app
    ->add_option("--max-site-failures", opt->max_site_failures,
                 "A site whose tasks fail this many times in a row sits out the rest of the run (0: never)")
    ->capture_default_str()
    ->type_name("N");
  app
    ->add_option("--seed", opt->seed,
                 "Seed for the sites' training (default: fedl.json's) and for sampling sites, then reproducible and "
                 "accounted without amplification (default: sampled in secret)")
    ->type_name("S");
  app->add_option("--heartbeat", opt->heartbeat, "Seconds between heartbeats; a peer silent 4x as long is dropped")
    ->capture_default_str()
    ->check(CLI::Range(0.05, 3600.0))
    ->type_name("SEC");
  add_compute_options(*app, opt->compute);
  return {app, [opt] { return run_serve(*opt); }};
}

} // namespace fedl::cmd
