// SPDX-License-Identifier: Apache-2.0
// fedl join: run a site. Reads the client bundle made by fedl init; the network session is in
// core/session and the training in a child process (fedl __worker), started at the first task.
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/federation/session.hpp"
#include "core/net/child.hpp"
#include "core/net/fork_server.hpp"
#include "core/trust/pki.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct JoinOptions
{
  fs::path bundle;
  std::optional<std::string> accountant;
  DataFlags data;
  std::optional<fs::path> eval_data;
  std::string metrics_set = "basic";
  std::optional<std::string> server;
  std::optional<std::string> server_name;
  double retry_max = 30;
  double retry_for = 0;
  std::uint32_t max_failures = core::JoinSettings{}.max_failures;
  double trainer_idle = 0;
  std::optional<fs::path> fork_server;
  std::optional<double> max_epsilon;
  std::optional<double> delta;
  std::optional<std::uint32_t> max_epochs;
  std::optional<double> min_noise_multiplier;
  bool require_secure_aggregation = false;
  ComputeOptions compute;
  SandboxFlags sandbox;
  std::optional<std::string> model_policy;
  std::optional<std::string> pin_model;
};

std::vector<std::string>
policy_names()
{
  std::vector<std::string> names;
  for (const auto p : core::model_policies) {
    names.emplace_back(core::model_policy_name(p));
  }
  return names;
}

// --model-policy and --pin-model: what this site accepts of a TorchScript module.
ModulePolicy
module_policy(const JoinOptions& opt)
{
  ModulePolicy p;
  if (opt.model_policy) {
    p.kind = ModulePolicy::parse(*opt.model_policy);
  }
  if (opt.pin_model) {
    if (opt.model_policy && p.kind != core::ModelPolicy::pinned) {
      throw core::UsageError("--pin-model pins the module: it goes with --model-policy pinned, not {}",
                             core::model_policy_name(p.kind));
    }
    const auto& pin = *opt.pin_model;
    if (!core::is_sha256_hex(pin)) {
      throw core::UsageError("--pin-model must be a SHA-256 in 64 lowercase hex digits (fedl inspect prints it), not "
                             "{}",
                             core::quote_text(pin));
    }
    p.kind = core::ModelPolicy::pinned;
    p.pin = pin;
  } else if (p.kind == core::ModelPolicy::pinned) {
    throw core::UsageError("--model-policy pinned needs --pin-model SHA256: the module to train (fedl inspect "
                           "prints its SHA-256)");
  }
  return p;
}

// The site's data (and validation data) against the federation's contract, before connecting: a
// site that cannot train on it would fail every task. The data flags as the contract completes
// them.
DataFlags
checked_data(const JoinOptions& opt, const std::optional<core::SiteContract>& contract)
{
  if (!fs::exists(opt.data.data)) {
    throw core::Error("--data {}: no such file", opt.data.data.string());
  }
  if (opt.eval_data && !fs::exists(*opt.eval_data)) {
    throw core::Error("--eval-data {}: no such file", opt.eval_data->string());
  }
  if (opt.metrics_set != "basic") {
    if (!opt.eval_data) {
      throw core::UsageError("--metrics-set {} measures the evaluation of each task's model: give --eval-data PATH",
                             opt.metrics_set);
    }
    if (contract && contract->classes > core::max_site_eval_classes) {
      throw core::UsageError("--metrics-set {} sends a confusion matrix with each update, for at most {} classes; "
                             "this model has {}",
                             opt.metrics_set, core::max_site_eval_classes, contract->classes);
    }
  }
  if (!contract) {
    return opt.data;
  }
  const auto where = (opt.bundle / "join.json").string();
  auto data = opt.data.with_contract(contract->data, where);
  const auto shape = core::parse_shape(contract->input_shape, where + " input_shape");
  check_data_file(data, contract->data, shape, contract->classes);
  if (opt.eval_data) {
    auto eval = data;
    eval.data = *opt.eval_data;
    check_data_file(eval, contract->data, shape, contract->classes);
  }
  return data;
}

int
run_join(const JoinOptions& opt)
{
  if (!fs::exists(opt.bundle / "join.json")) {
    throw core::UsageError("{} is not a client bundle (no join.json); give the folder clients/NAME that fedl init made",
                           opt.bundle.string());
  }
  for (const char* f : {"client.crt", "client.key", "ca.crt"}) {
    if (!fs::exists(opt.bundle / f)) {
      throw core::UsageError("{}: {} is missing from the client bundle", opt.bundle.string(), f);
    }
  }
  core::JoinSettings s;
  const auto [j, contract] = core::read_join(opt.bundle, core::read_certificate(opt.bundle / "ca.crt"));
  s.contract = contract;
  if (contract) {
    s.max_model_bytes = contract->max_model_bytes();
  } else {
    FEDL_LOG_WARN("{}: made by an older fedl, with no contract: this site holds tasks only to fedl's built-in limits "
                  "(ask the operator for a new bundle)",
                  (opt.bundle / "join.json").string());
  }
  const auto data = checked_data(opt, contract);
  s.bundle = opt.bundle;
  s.max_epochs = opt.max_epochs;
  if (opt.min_noise_multiplier && !(*opt.min_noise_multiplier > 0 && std::isfinite(*opt.min_noise_multiplier))) {
    throw core::UsageError("--min-noise-multiplier must be a positive number, not {}", *opt.min_noise_multiplier);
  }
  s.min_noise_multiplier = opt.min_noise_multiplier;
  s.require_secure_aggregation = opt.require_secure_aggregation;
  s.server = core::parse_host_port(opt.server.value_or(j["server"].get<std::string>()),
                                   opt.server ? "--server" : (opt.bundle / "join.json").string() + " server");
  s.server_name = opt.server_name.value_or(j["server_name"].get<std::string>());
  s.retry_max = opt.retry_max;
  s.retry_for = opt.retry_for;
  s.max_failures = opt.max_failures;
  s.trainer_idle = opt.trainer_idle;
  // Checked here, at start, rather than by the trainer at the first task: the policy's checks of
  // the module file (strict, the pin; the trainer inspects the module itself, with the backend).
  const auto policy = module_policy(opt);
  if (fs::exists(opt.bundle / "model.pt")) {
    policy.check_file(opt.bundle / "model.pt");
  }
  s.model_policy = policy.kind;
  const auto sandbox = opt.sandbox.policy("the trainer");
  s.sandbox = sandbox.level;
  if (opt.fork_server) {
    const auto socket = fs::absolute(*opt.fork_server);
    core::check_socket_path(socket);
    s.fork_server = core::ForkServerRef{socket,
                                        {core::self_executable().string(), "--log-format", globals().log_format,
                                         "__fork-server", "--detach", socket.string()}};
    if (sandbox.level != core::SandboxLevel::off) {
      // Its trainers load the backends inside their sandbox, not before the fork.
      s.fork_server->start.push_back("--no-preload");
    }
  }
  s.accountant = resolve_accountant(opt.accountant).value_or(s.accountant);
  if (opt.delta && !opt.max_epsilon) {
    throw core::UsageError("--delta is the delta of the site's budget: give --max-epsilon E too");
  }
  if (opt.max_epsilon) {
    if (!(*opt.max_epsilon > 0) || !std::isfinite(*opt.max_epsilon)) {
      throw core::UsageError("--max-epsilon must be a positive number, not {}", *opt.max_epsilon);
    }
    s.max_epsilon = opt.max_epsilon;
    s.delta = opt.delta.value_or(1e-5);
    if (!(s.delta > 0 && s.delta < 1)) {
      throw core::UsageError("--delta must be between 0 and 1 (exclusive), not {}", s.delta);
    }
  }
  s.trainer_argv = {
    core::self_executable().string(), "__worker", "--log-format", globals().log_format, "--max-model-bytes",
    std::to_string(s.max_model_bytes)};
  if (globals().quiet) {
    s.trainer_argv.push_back("--quiet");
  }
  const auto data_args = data.to_args();
  s.trainer_argv.insert(s.trainer_argv.end(), data_args.begin(), data_args.end());
  if (opt.eval_data) {
    s.trainer_argv.insert(s.trainer_argv.end(),
                          {"--eval-data", opt.eval_data->string(), "--metrics-set", opt.metrics_set});
  }
  if (fs::exists(opt.bundle / "model.pt")) {
    s.trainer_argv.insert(s.trainer_argv.end(), {"--torchscript", (opt.bundle / "model.pt").string()});
  }
  s.trainer_argv.insert(s.trainer_argv.end(), {"--model-policy", std::string(core::model_policy_name(policy.kind))});
  if (policy.pin) {
    s.trainer_argv.insert(s.trainer_argv.end(), {"--pin-model", *policy.pin});
  }
  s.trainer_argv.insert(s.trainer_argv.end(), {"--device", opt.compute.device});
  const auto sandbox_args = opt.sandbox.to_args();
  s.trainer_argv.insert(s.trainer_argv.end(), sandbox_args.begin(), sandbox_args.end());
  if (opt.compute.threads > 0) {
    s.trainer_argv.insert(s.trainer_argv.end(), {"--threads", std::to_string(opt.compute.threads)});
  }
  const auto summary = core::run_site(s);
  print_result(summary, fmt::format("site {}: {} after round {}, trained {}\n", summary["site"].get<std::string>(),
                                    summary["reason"].get<std::string>() == "done" ? "federation finished" : "stopped",
                                    summary["last_round"].get<std::uint64_t>(),
                                    core::count_of(summary["rounds_trained"].get<std::uint64_t>(), "round")));
  return summary.value("interrupted", false) ? static_cast<int>(core::ExitCode::interrupted) : 0;
}

} // namespace

Command
add_join(CLI::App& parent)
{
  auto opt = std::make_shared<JoinOptions>();
  auto* app = parent.add_subcommand("join", "Run a site: connect to the coordinator, train each task, send updates");
  app->add_option("bundle", opt->bundle, "The site's client bundle (clients/NAME from fedl init)")
    ->required()
    ->type_name("DIR");
  add_data_options(*app, opt->data);
  app
    ->add_option("--eval-data", opt->eval_data,
                 "Evaluate each task's global model on this validation data and report accuracy and loss with the "
                 "update (federated evaluation; laid out as --data)")
    ->type_name("PATH");
  add_metrics_set_option(*app, opt->metrics_set, "What --eval-data measures and the update reports");
  app->add_option("--server", opt->server, "Coordinator address (default: the bundle's join.json)")
    ->type_name("HOST:PORT");
  app
    ->add_option("--server-name", opt->server_name,
                 "Name the coordinator's certificate must carry (default: join.json)")
    ->type_name("NAME");
  app->add_option("--retry-max", opt->retry_max, "Longest wait between reconnection attempts, seconds")
    ->capture_default_str()
    ->check(CLI::Range(0.1, 86400.0))
    ->type_name("SEC");
  app
    ->add_option("--max-failures", opt->max_failures,
                 "Stop (exit 1) once the trainer has failed this many tasks in a row the same way (0: never)")
    ->capture_default_str()
    ->type_name("N");
  app->add_option("--retry-for", opt->retry_for, "Give up (exit 1) after this long without the coordinator (0: never)")
    ->capture_default_str()
    ->check(CLI::NonNegativeNumber)
    ->type_name("SEC");
  app
    ->add_option("--trainer-idle", opt->trainer_idle,
                 "Stop the trainer (and free its memory) after this long without a task (0: keep it)")
    ->capture_default_str()
    ->check(CLI::NonNegativeNumber)
    ->type_name("SEC");
  app
    ->add_option("--fork-server", opt->fork_server,
                 "Start the trainer as a fork of the server on this Unix socket (started if none runs), which has "
                 "LibTorch loaded already: for many sites on one host")
    ->type_name("SOCKET");
  app
    ->add_option("--max-epsilon", opt->max_epsilon,
                 "The site's own privacy budget: refuse (exit 4) any task whose DP-SGD would take it past this")
    ->type_name("E");
  app->add_option("--delta", opt->delta, "The delta of --max-epsilon (default 1e-5)")->type_name("D");
  add_accountant_option(*app, opt->accountant, "How the site's own account (privacy.jsonl) computes epsilon");
  app
    ->add_option("--max-epochs", opt->max_epochs,
                 "Refuse tasks of more epochs than this (tightens the bundle's contract)")
    ->check(CLI::Range(1U, 100000U))
    ->type_name("N");
  app
    ->add_option("--min-noise-multiplier", opt->min_noise_multiplier,
                 "Refuse tasks without DP-SGD of at least this noise multiplier (tightens the contract)")
    ->type_name("S");
  app->add_flag("--require-secure-aggregation", opt->require_secure_aggregation,
                "Refuse tasks that would send this site's update in clear (without secure aggregation)");
  app
    ->add_option("--model-policy", opt->model_policy,
                 "What this site trains of a TorchScript module: strict (none: fedl's own architectures only), "
                 "inspect (one that passes the operator allow-list; the default), pinned (only the one --pin-model "
                 "names, inspected too)")
    ->check(CLI::IsMember(policy_names()))
    ->type_name("POLICY");
  app->add_option("--pin-model", opt->pin_model, "Train only the TorchScript module of this SHA-256 (fedl inspect)")
    ->type_name("SHA256");
  add_compute_options(*app, opt->compute);
  add_sandbox_options(*app, opt->sandbox);
  return {app, [opt] { return run_join(*opt); }};
}

} // namespace fedl::cmd
