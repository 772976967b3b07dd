// SPDX-License-Identifier: Apache-2.0
// fedl eval: accuracy and loss of a model on a data file.
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <thread>

namespace fedl::cmd {

namespace {

struct EvalOptions
{
  DataFlags data;
  ComputeOptions compute;
  ModelSource model;
  std::uint32_t batch_size = default_eval_batch_size;
  std::string metrics_set = "basic";
};

int
run_eval(const EvalOptions& opt)
{
  check_model_source(opt.model);
  const auto data = core::load_dataset(opt.data.to_options());
  const auto [backend, device] = open_backend(opt.compute);
  auto m = open_model(*backend, device, opt.model, data);
  const auto j = evaluate_model(m, data, opt.batch_size, *core::parse_metrics_set(opt.metrics_set)).summary();
  print_result(j, metrics_text(j));
  return 0;
}

} // namespace

Command
add_eval(CLI::App& parent)
{
  auto opt = std::make_shared<EvalOptions>();
  auto* app = parent.add_subcommand(
    "eval", "Evaluate a model on a data file: accuracy, loss, samples; per-class metrics, F1, ROC AUC");
  add_data_options(*app, opt->data);
  app->add_option("--model", opt->model.model, "Model file (safetensors written by fedl)")
    ->required()
    ->type_name("FILE");
  app->add_option("--torchscript", opt->model.torchscript, "TorchScript module whose weights --model holds")
    ->type_name("FILE");
  app->add_option("-b,--batch-size", opt->batch_size, "Samples per forward pass")
    ->capture_default_str()
    ->check(CLI::Range(1U, 1U << 24));
  add_metrics_set_option(*app, opt->metrics_set, "What to measure");
  add_compute_options(*app, opt->compute);
  return {app, [opt] { return run_eval(*opt); }};
}

} // namespace fedl::cmd
