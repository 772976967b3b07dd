// SPDX-License-Identifier: Apache-2.0
// fedl init: provision a federation workspace (PKI, client bundles, fedl.json, the initial
// global model, the ledger's genesis entry), optionally with per-site shards of a data set;
// on an existing workspace, --add-client and --revoke.
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/config/config.hpp"
#include "core/federation/serve_settings.hpp"
#include "core/format/model_spec.hpp"
#include "core/format/partition.hpp"
#include "core/math/aggregate.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <numeric>
#include <thread>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct InitOptions
{
  fs::path ws;
  std::optional<std::uint32_t> clients;
  std::vector<std::string> client_names;
  std::optional<std::string> arch;
  std::optional<fs::path> torchscript;
  std::optional<std::string> input_dim;
  std::optional<std::int64_t> classes;
  std::vector<std::string> server_names;
  std::string listen = "0.0.0.0:7443";
  std::uint32_t rounds = 10;
  std::string strategy = "fedavg";
  std::uint64_t seed = 0;
  std::uint32_t valid_days = 365;
  bool force = false;
  std::optional<std::string> add_client;
  std::optional<std::string> revoke;
  DataFlags partition;
  std::string split = "iid";
  double holdout = 0.0;
  core::TrainingConfig training;         // the sites' local training, sent with each task
  DpSgdFlags dp;                         // ... and its DP-SGD
  std::optional<std::string> accountant; // fedl.json privacy.accountant
  core::PrivacyConfig privacy;           // client-level DP and the federation's budget, for fedl serve
  SecureAggregationFlags secure;         // fedl.json secure_aggregation, for fedl serve
  std::optional<double> max_update_norm; // fedl.json limits
  std::optional<std::uint64_t> max_num_samples;
  std::optional<std::uint32_t> min_clients;
  ComputeOptions compute;
};

// Writes models/global-000000.safetensors (and model.pt) into `dir` from the model options.
void
write_initial_model(const InitOptions& opt, core::FederationConfig& config, const fs::path& dir)
{
  const auto [backend, device] = open_backend(opt.compute);
  fs::create_directories(dir / "models");
  std::optional<backends::Model> model;
  if (opt.torchscript) {
    fs::copy_file(*opt.torchscript, dir / "model.pt");
    config.model.arch = "torchscript";
    config.model.torchscript = "model.pt";
    // Inspected as every site will (a module they would refuse is refused here, at once).
    (void)check_module(*backend, dir / "model.pt", ModulePolicy{});
    model.emplace(backends::Model::load_torchscript(*backend, device, dir / "model.pt"));
  } else {
    model.emplace(backends::Model::create(*backend, device, config.model.arch, config.model.input_shape,
                                          config.model.classes, opt.seed));
  }
  const core::Metadata meta{{"fedl.kind", "model"},
                            {"fedl.arch", config.model.arch},
                            {"fedl.input_shape", core::shape_to_string(config.model.input_shape)},
                            {"fedl.classes", std::to_string(config.model.classes)},
                            {"fedl.round", "0"}};
  core::write_safetensors(dir / core::Workspace::model_name(0), model->weights(), meta);
}

nlohmann::json
write_partition(const InitOptions& opt, const core::Dataset& data, const core::Workspace& ws,
                const std::vector<std::string>& names)
{
  const auto sites = names.size();
  const auto spec = core::parse_split(opt.split);
  const auto part = core::make_partition(data.labels, sites, spec, opt.holdout, opt.seed);
  const core::SubsetWriter writer(data, opt.partition.to_options());
  nlohmann::json out = nlohmann::json::object();
  for (std::size_t i = 0; i < sites; ++i) {
    writer.write(part.sites[i], ws.client(names[i]) / "data", core::SubsetRole::train);
    const auto summary = core::summarize(data.labels, part.sites[i]);
    out[names[i]] = summary.samples;
    FEDL_LOG_INFO("{}: {}", names[i], core::format_summary(summary));
  }
  if (!part.holdout.empty()) {
    writer.write(part.holdout, ws.data(), core::SubsetRole::test);
    out["holdout"] = part.holdout.size();
    FEDL_LOG_INFO("holdout: {}", core::format_summary(core::summarize(data.labels, part.holdout)));
  }
  return out;
}

// The sites' names: --client NAME... or site-1..site-N; each valid and given once.
std::vector<std::string>
site_names(const InitOptions& opt)
{
  if (opt.clients && !opt.client_names.empty()) {
    throw core::UsageError("give the sites with --clients N or with --client NAME, not both");
  }
  std::vector<std::string> names = opt.client_names;
  if (opt.clients) {
    for (std::uint32_t i = 1; i <= *opt.clients; ++i) {
      names.push_back(fmt::format("site-{}", i));
    }
  }
  if (names.empty()) {
    throw core::UsageError("a federation needs sites: give --clients N or --client NAME ...");
  }
  for (const auto& n : names) {
    core::check_site_name(n);
    if (std::count(names.begin(), names.end(), n) > 1) {
      throw core::UsageError("site {} is named twice", n);
    }
  }
  return names;
}

// fedl.json's settings from the options, checked against each other and against the data set to
// partition (--partition), which is loaded into `data`: its sample shape, classes and size.
core::FederationConfig
federation_config(const InitOptions& opt, const std::vector<std::string>& names, std::optional<core::Dataset>& data)
{
  core::FederationConfig config;
  config.clients = names;
  config.listen = opt.listen;
  if (!opt.server_names.empty()) {
    config.server_names = opt.server_names;
  }
  config.rounds = opt.rounds;
  config.strategy = opt.strategy;
  config.seed = opt.seed;
  config.valid_days = opt.valid_days;
  config.training = opt.training;
  config.training.dp = opt.dp.resolve();
  config.min_clients = opt.min_clients.value_or(0);
  config.privacy = opt.privacy;
  config.privacy.accountant = resolve_accountant(opt.accountant).value_or(config.privacy.accountant);
  core::check_privacy(config.privacy,
                      {"--client-dp-clip-norm", "--client-dp-noise-multiplier", "--max-epsilon", "--delta"});
  config.secure_aggregation = opt.secure.resolve(std::nullopt);
  if (config.secure_aggregation) {
    core::check_secure_fits(*config.secure_aggregation, core::parse_strategy(opt.strategy), config.privacy,
                            "--client-dp-clip-norm and --client-dp-noise-multiplier");
  }
  if (!opt.partition.data.empty()) {
    core::require_partitionable(opt.partition.data);
    data = core::load_dataset(opt.partition.to_options());
    // How every site's data and the evaluator's must be laid out, as this data set is.
    config.data = core::DataContract::of(*data, opt.partition.to_options());
  }
  config.limits.max_update_norm = opt.max_update_norm.value_or(config.limits.max_update_norm);
  // No site of a partitioned data set can honestly train on more samples than the whole of it.
  config.limits.max_num_samples =
    opt.max_num_samples.value_or(data ? std::max<std::uint64_t>(data->size(), 1) : config.limits.max_num_samples);
  core::check_limits(config.limits, "--max-update-norm", "--max-num-samples");
  if (opt.input_dim) {
    config.model.input_shape = core::parse_shape(*opt.input_dim, "--input-dim");
  } else if (data) {
    config.model.input_shape = data->sample_shape;
  } else {
    throw core::UsageError("the model's input size is unknown: give --input-dim D (or 1,28,28) or --partition DATA");
  }
  config.model.classes = opt.classes.value_or(data ? data->num_classes() : 0);
  if (config.model.classes < 2) {
    throw core::UsageError("the number of classes is unknown: give --classes K (or --partition DATA)");
  }
  if (data) {
    if (static_cast<std::size_t>(std::accumulate(config.model.input_shape.begin(), config.model.input_shape.end(),
                                                 std::int64_t{1}, std::multiplies<>())) != data->sample_numel()) {
      throw core::UsageError("--input-dim {} does not fit {}, whose samples have shape {}",
                             core::shape_to_string(config.model.input_shape), data->source.string(),
                             data->shape_string());
    }
    for (std::size_t i = 0; i < data->size(); ++i) {
      if (data->labels[i] >= config.model.classes) {
        throw core::Error("{}: label {} is outside the model's {} classes (--classes)", data->where(i), data->labels[i],
                          config.model.classes);
      }
    }
  }
  if (opt.arch) {
    const auto spec = core::parse_model_spec(*opt.arch);
    spec.check_input(config.model.input_shape);
    config.model.arch = spec.text;
  }
  return config;
}

int
run_create(const InitOptions& opt)
{
  if (opt.arch.has_value() == opt.torchscript.has_value()) {
    throw core::UsageError("give the model with exactly one of --arch SPEC or --torchscript FILE");
  }
  const auto names = site_names(opt);
  if (!opt.partition.data.empty() && opt.holdout >= 1.0) {
    throw core::UsageError("--holdout must be below 1");
  }
  (void)core::parse_strategy(opt.strategy);
  core::check_can_create_workspace(opt.ws, opt.force);

  std::optional<core::Dataset> data;
  auto config = federation_config(opt, names, data);

  nlohmann::json genesis;
  nlohmann::json shards;
  core::create_workspace(opt.ws, opt.force, [&](const core::Workspace& staging) {
    write_initial_model(opt, config, staging.root());
    genesis = core::provision_workspace(staging, config, fs::absolute(opt.ws).filename().string());
    if (data) {
      shards = write_partition(opt, *data, staging, names);
    }
  });

  // The model relative to the workspace, as serve, audit and aggregate name a workspace's models.
  nlohmann::json j = {{"workspace", opt.ws.string()},
                      {"clients", names},
                      {"model", core::Workspace::model_name(0)},
                      {"model_sha256", genesis["model"]["sha256"]},
                      {"arch", config.model.arch},
                      {"ca_fingerprint", genesis["ca_fingerprint"]}};
  if (data) {
    j["partition"] = shards;
  }
  print_result(j, fmt::format("created federation workspace {}: {} sites ({}), model {}, CA {}\n", opt.ws.string(),
                              names.size(), fmt::join(names, ", "), config.model.arch,
                              genesis["ca_fingerprint"].get<std::string>().substr(0, 16)));
  return 0;
}

int
run_init(InitOptions opt)
{
  // "ws/" and "ws" name the same folder; the staging folder goes beside it, not inside it.
  opt.ws = opt.ws.lexically_normal();
  if (!opt.ws.has_filename() && opt.ws.has_parent_path()) {
    opt.ws = opt.ws.parent_path();
  }
  if (opt.add_client && opt.revoke) {
    throw core::UsageError("--add-client and --revoke are separate changes; run fedl init twice");
  }
  if (!opt.add_client && !opt.revoke) {
    return run_create(opt);
  }
  const core::Workspace ws(opt.ws);
  ws.require_exists();
  if (opt.add_client) {
    const auto body = core::add_client(ws, *opt.add_client);
    print_result(body,
                 fmt::format("added site {} (bundle {})\n", *opt.add_client, ws.client(*opt.add_client).string()));
  } else {
    const auto body = core::revoke_client(ws, *opt.revoke);
    print_result(body, fmt::format("revoked site {} (serial {})\n", *opt.revoke, body["serial"].get<std::string>()));
  }
  return 0;
}

} // namespace

Command
add_init(CLI::App& parent)
{
  auto opt = std::make_shared<InitOptions>();
  auto* app =
    parent.add_subcommand("init", "Create a federation workspace: CA, certificates, config, initial model, ledger");
  app->add_option("workspace", opt->ws, "The workspace folder")->required()->type_name("WS");
  auto* clients = app->add_option("--clients", opt->clients, "Number of sites, named site-1 ... site-N")
                    ->check(CLI::Range(1U, 100000U))
                    ->type_name("N");
  app->add_option("--client", opt->client_names, "A site by name (repeat for each site)")
    ->type_name("NAME")
    ->excludes(clients);
  with_suggestions(app->add_option("--arch", opt->arch, "Zoo model: logreg, mlp:H1[,H2...], cnn"), arch_suggestions())
    ->type_name("SPEC");
  app->add_option("--torchscript", opt->torchscript, "A TorchScript module (torch.jit.save) as the model")
    ->type_name("FILE")
    ->check(CLI::ExistingFile);
  app->add_option("--input-dim", opt->input_dim, "Input size or shape, e.g. 64 or 1,28,28 (default: from --partition)")
    ->type_name("D");
  app->add_option("--classes", opt->classes, "Number of classes (default: from --partition)")
    ->check(CLI::Range(2, 1 << 20))
    ->type_name("K");
  app
    ->add_option("--server-name", opt->server_names,
                 "Coordinator host name or IP for its certificate (repeat; "
                 "default: localhost and 127.0.0.1)")
    ->type_name("HOST");
  app->add_option("--listen", opt->listen, "Address the coordinator listens on")
    ->capture_default_str()
    ->type_name("HOST:PORT");
  app->add_option("--rounds", opt->rounds, "Rounds to run")->capture_default_str()->check(CLI::Range(1U, 1000000U));
  with_suggestions(app->add_option("--strategy", opt->strategy, "Aggregation strategy (see fedl-aggregate(1))"),
                   strategy_suggestions())
    ->capture_default_str()
    ->type_name("S");
  app->add_option("--seed", opt->seed, "Seed for the initial model and the partition")->capture_default_str();
  app->add_option("--valid-days", opt->valid_days, "Validity of the certificates in days")
    ->capture_default_str()
    ->check(CLI::Range(1U, 36500U));
  app->add_option("--min-clients", opt->min_clients, "Quorum of updates per round for fedl serve (default 2)")
    ->check(CLI::Range(1U, 1000000U))
    ->type_name("K");
  app->add_option("-e,--epochs", opt->training.epochs, "Local epochs per round at each site")
    ->capture_default_str()
    ->check(CLI::Range(1U, 100000U));
  app->add_option("-b,--batch-size", opt->training.batch_size, "Local batch size")
    ->capture_default_str()
    ->check(CLI::Range(1U, 1U << 24));
  app->add_option("--lr", opt->training.lr, "Local learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  with_choices(app->add_option("--optimizer", opt->training.optimizer, "Local optimizer")->capture_default_str(),
               {"sgd", "adam"});
  app->add_option("--momentum", opt->training.momentum, "Local SGD momentum")
    ->capture_default_str()
    ->check(CLI::Range(0.0, 1.0));
  app->add_option("--prox-mu", opt->training.prox_mu, "FedProx proximal term weight for the sites (0: off)")
    ->capture_default_str()
    ->check(CLI::NonNegativeNumber);
  add_dp_sgd_options(*app, opt->dp);
  app
    ->add_option("--client-dp-clip-norm", opt->privacy.clip_norm,
                 "Client-level DP for fedl serve: clip each update to this L2 norm (fedl.json privacy)")
    ->type_name("C");
  app
    ->add_option("--client-dp-noise-multiplier", opt->privacy.noise_multiplier,
                 "Client-level DP for fedl serve: noise over the clip norm (fedl.json privacy)")
    ->type_name("S");
  app
    ->add_option("--max-epsilon", opt->privacy.max_epsilon,
                 "The federation's budget on client-level epsilon, for fedl serve (fedl.json privacy)")
    ->type_name("E");
  app->add_option("--delta", opt->privacy.delta, "The delta of --max-epsilon (default 1e-5)")->type_name("D");
  add_accountant_option(
    *app, opt->accountant,
    "How the federation's ledger computes epsilon, client-level and each site's (fedl.json privacy)");
  add_secure_aggregation_options(*app, opt->secure);
  app
    ->add_option("--max-update-norm", opt->max_update_norm,
                 "fedl serve rejects an update whose L2 norm is larger (fedl.json limits; default 1e5)")
    ->type_name("X");
  app
    ->add_option("--max-num-samples", opt->max_num_samples,
                 "fedl serve rejects an update claiming more samples (fedl.json limits; default: the "
                 "--partition data's size, else 10000000)")
    ->type_name("N");
  app->add_flag("--force", opt->force, "Replace an existing workspace");
  app->add_option("--add-client", opt->add_client, "Add a site to an existing workspace")->type_name("NAME");
  app->add_option("--revoke", opt->revoke, "Revoke a site's certificate in an existing workspace")->type_name("NAME");
  app->add_option("--partition", opt->partition.data, "Split this data set into per-site shards (CSV or IDX)")
    ->type_name("PATH");
  add_data_format_options(*app, opt->partition);
  with_suggestions(app->add_option("--split", opt->split, "How --partition splits: iid, dirichlet:ALPHA or shards:K"),
                   {"iid", "dirichlet:0.5", "shards:2"})
    ->capture_default_str()
    ->type_name("S");
  app->add_option("--holdout", opt->holdout, "Fraction of --partition kept as a test set in WS/data/")
    ->capture_default_str()
    ->check(CLI::Range(0.0, 0.99));
  add_compute_options(*app, opt->compute);
  return {app, [opt] { return run_init(*opt); }};
}

} // namespace fedl::cmd
