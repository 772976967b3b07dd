// SPDX-License-Identifier: Apache-2.0
// fedl train: one local training job on files, no network: model in, update and/or model out.
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>
#include <unistd.h>

namespace fedl::cmd {

namespace {

volatile std::sig_atomic_t g_interrupted = 0;

struct TrainOptions
{
  DataFlags data;
  ComputeOptions compute;
  ModelSource model;
  std::optional<std::filesystem::path> out;
  std::optional<std::filesystem::path> save_model;
  std::optional<std::filesystem::path> identity;
  TrainingSettings training;
  DpSgdFlags dp;
  std::optional<std::string> accountant;
  SandboxFlags sandbox;
};

// Where train writes its outputs: their places, or under the sandbox, files in staging folders
// beside them that the sandbox's parent moves into place once training has succeeded.
struct OutputPaths
{
  std::optional<std::filesystem::path> out;
  std::optional<std::filesystem::path> save_model;
};

// Its inputs readable; its outputs written in staging folders of their own, nothing else.
OutputPaths
enter_train_sandbox(const TrainOptions& opt)
{
  auto policy = opt.sandbox.policy("fedl train");
  OutputPaths paths{opt.out, opt.save_model};
  if (policy.level == core::SandboxLevel::off) {
    enter_trainer_sandbox(std::move(policy));
    return paths;
  }
  policy.read = core::dataset_files(opt.data.to_options());
  for (const auto& f : {opt.model.model, opt.model.torchscript}) {
    if (f) {
      policy.read.push_back(*f);
    }
  }
  std::map<std::filesystem::path, std::filesystem::path> staging_of; // output folder -> staging folder
  for (auto* path : {&paths.out, &paths.save_model}) {
    if (!*path) {
      continue;
    }
    const auto final_path = std::filesystem::absolute(**path);
    const auto folder = final_path.parent_path();
    auto& staging = staging_of[folder];
    if (staging.empty()) {
      auto name = (folder / ".fedl-train-XXXXXX").string();
      if (::mkdtemp(name.data()) == nullptr) {
        throw core::Error("cannot make a staging folder in {} for {}: {}", folder.string(), path->value().string(),
                          std::strerror(errno));
      }
      staging = name;
      policy.write.push_back(staging);
      policy.staging.push_back(staging);
    }
    const auto staged = staging / final_path.filename();
    policy.publish.emplace_back(staged, final_path);
    *path = staged;
  }
  try {
    enter_trainer_sandbox(policy);
  } catch (...) {
    for (const auto& dir : policy.staging) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
    throw;
  }
  return paths;
}

int
run_train(TrainOptions opt)
{
  opt.training.dp = opt.dp.resolve();
  if (const auto accountant = resolve_accountant(opt.accountant)) {
    if (!opt.training.dp) {
      throw core::UsageError("--accountant says how DP-SGD's epsilon is computed: give --dp-noise-multiplier S and "
                             "--dp-max-grad-norm C too");
    }
    opt.training.dp->accountant = *accountant;
  }
  if (!opt.out && !opt.save_model) {
    throw core::UsageError("nothing to write: give --out UPDATE and/or --save-model FILE");
  }
  check_model_source(opt.model);
  if (opt.identity && !opt.out) {
    throw core::UsageError("--identity signs an update: give --out UPDATE too");
  }
  // Read the site's identity first: a bad bundle should fail before minutes of training.
  // (Read before the sandbox, the key is in the trainer's memory: fedl join's trainer never holds
  // it, and is what to use with a model or backend that is not trusted.)
  std::optional<core::Identity> identity;
  if (opt.identity) {
    identity = core::read_identity(*opt.identity / "client.crt", *opt.identity / "client.key");
  }
  const auto write_to = enter_train_sandbox(opt);
  const auto data = core::load_dataset(opt.data.to_options());
  FEDL_LOG_INFO("{}: {} samples of shape {}", opt.data.data.string(), data.size(), data.shape_string());

  // Before the backend loads: a batch larger than the data is a usage error under DP-SGD.
  const auto dp = dp_plan(opt.training, data.size());
  const auto [backend, device] = open_backend(opt.compute);

  auto m = open_model(*backend, device, opt.model, data);
  std::optional<UpdateBase> base;
  if (opt.out) {
    base = update_base(m);
  }

  const bool tty = ::isatty(STDERR_FILENO) != 0 && !globals().quiet && globals().log_format == "text";
  double first_batch = -1;
  const auto t0 = uptime_seconds();
  g_interrupted = 0;
  auto* old_int = std::signal(SIGINT, [](int) { g_interrupted = 1; });
  auto* old_term = std::signal(SIGTERM, [](int) { g_interrupted = 1; });
  const auto epochs = opt.training.epochs;
  const auto progress = [&](std::uint32_t epoch, std::uint64_t step, std::uint64_t per_epoch, double loss,
                            bool epoch_end) {
    if (first_batch < 0) {
      first_batch = uptime_seconds();
    }
    if (tty) {
      fmt::print(stderr, "\rfedl: epoch {}/{} step {}/{} loss {:.4f}{}", epoch, epochs, step, per_epoch, loss,
                 epoch_end ? "\x1b[K\n" : "\x1b[K");
    } else if (epoch_end) {
      FEDL_LOG_INFO("epoch {}/{}: loss {:.4f} ({:.1f} s)", epoch, epochs, loss, uptime_seconds() - t0);
    }
    return g_interrupted == 0;
  };
  const auto result = train_model(m, data, opt.training, opt.model.seed, progress);
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  const double train_seconds = uptime_seconds() - t0;

  nlohmann::json j = {{"samples", data.size()}, {"epochs", epochs}, {"steps", result.steps},
                      {"loss", result.loss},    {"device", device}, {"seconds", train_seconds},
                      {"arch", m.arch}};
  if (first_batch >= 0) {
    j["first_batch_seconds"] = first_batch;
  }
  std::string text =
    fmt::format("trained {} for {} on {} ({}): loss {:.4f}, {:.1f} s\n", m.arch, core::count_of(epochs, "epoch"),
                core::count_of(data.size(), "sample"), device, result.loss, train_seconds);
  if (dp) {
    j["dp"] = dp->to_json();
    text += fmt::format("DP-SGD: epsilon {:.4g} at delta {:g} (sample rate {:.4g}, noise multiplier {:g}, clip {:g}, "
                        "{} steps)\n",
                        dp->epsilon, dp->delta, dp->sample_rate, dp->noise_multiplier, dp->max_grad_norm, dp->steps);
  }
  if (opt.save_model) {
    core::write_safetensors(*write_to.save_model, m.model.weights(), model_metadata(m, "model"));
    j["model"] = opt.save_model->string();
    text += fmt::format("model: {}\n", opt.save_model->string());
  }
  if (opt.out) {
    auto update = make_update(m, *base, data.size(), epochs, result.loss, dp);
    auto& meta = update.metadata;
    const auto views = update.views();
    if (identity) {
      j["site"] = core::sign_update(views, meta, *identity);
    }
    core::write_safetensors(*write_to.out, views, meta);
    j["update"] = opt.out->string();
    j["base_sha256"] = base->sha256;
    text += fmt::format("update: {} (base {})\n", opt.out->string(), base->sha256);
  }
  // From the process's start, as first_batch_seconds (which it was measured against before: the
  // time before the data loaded was left out, and the first batch could come after the "total").
  j["total_seconds"] = uptime_seconds();
  print_result(j, text);
  return 0;
}

} // namespace

Command
add_train(CLI::App& parent)
{
  auto opt = std::make_shared<TrainOptions>();
  auto* app = parent.add_subcommand("train", "Train a model on local data files; write an update and/or the model");
  add_data_options(*app, opt->data);
  auto* model =
    app->add_option("--model", opt->model.model, "Starting model (safetensors written by fedl)")->type_name("FILE");
  auto* arch = with_suggestions(app->add_option("--arch", opt->model.arch,
                                                "Start from a fresh zoo model: logreg, mlp:H1[,H2...], cnn"),
                                arch_suggestions())
                 ->type_name("SPEC");
  app->add_option("--torchscript", opt->model.torchscript, "A TorchScript module (torch.jit.save) to train")
    ->type_name("FILE");
  arch->excludes(model);
  app->add_option("--classes", opt->model.classes, "Number of classes for --arch (default: largest label + 1)")
    ->check(CLI::Range(1, 1 << 20))
    ->type_name("K");
  app->add_option("--out", opt->out, "Write the update (trained minus starting weights) here")->type_name("UPDATE");
  app->add_option("--save-model", opt->save_model, "Write the trained model here")->type_name("FILE");
  app->add_option("--identity", opt->identity, "Sign the update with this site bundle (clients/NAME from fedl init)")
    ->type_name("DIR");
  app->add_option("-e,--epochs", opt->training.epochs, "Passes over the data (0 writes the starting model)")
    ->capture_default_str()
    ->check(CLI::Range(0U, TrainingSettings::max_epochs));
  app->add_option("-b,--batch-size", opt->training.batch_size, "Samples per step")
    ->capture_default_str()
    ->check(CLI::Range(1U, TrainingSettings::max_batch_size));
  app->add_option("--lr", opt->training.lr, "Learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  with_choices(app->add_option("--optimizer", opt->training.optimizer, "Optimizer")->capture_default_str(),
               {"sgd", "adam"});
  app->add_option("--momentum", opt->training.momentum, "SGD momentum")
    ->capture_default_str()
    ->check(CLI::Range(0.0, 1.0));
  app->add_option("--prox-mu", opt->training.prox_mu, "FedProx proximal term weight (0: off)")
    ->capture_default_str()
    ->check(CLI::NonNegativeNumber);
  add_dp_sgd_options(*app, opt->dp);
  add_accountant_option(*app, opt->accountant, "DP-SGD: how epsilon is computed");
  app->add_option("--seed", opt->model.seed, "Seed for initialisation and shuffling")->capture_default_str();
  add_compute_options(*app, opt->compute);
  add_sandbox_options(*app, opt->sandbox);
  return {app, [opt] { return run_train(*opt); }};
}

} // namespace fedl::cmd
