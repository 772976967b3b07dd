// SPDX-License-Identifier: Apache-2.0
// fedl __worker (hidden): the trainer and evaluator child of `fedl join` and `fedl serve`, so that
// the network process never loads LibTorch. It reads frames (core/net/frame.hpp) on stdin and answers
// each on stdout; its log goes to stderr, which it shares with its parent.
//
// The messages are core/net/trainer_protocol.hpp's:
//   TASK (TrainTask, body: a fedl model) -> UPDATE (TrainResult, body: the update file, as
//          `fedl train --model M --out U --seed S` writes it plus fedl.round=N, unsigned). With
//          a budget, a task whose DP-SGD would take the site's account (spent + this run) past
//          its --max-epsilon is refused before training (ERROR, code 4).
//   EVAL (body: a fedl model) -> RESULT (EvalResult), as `fedl eval` computes it
//   a task that fails -> ERROR (ChildError: the message, the exit code fedl would give, and the
//          ReasonClass of the step that failed); it goes on
//
// End of file on stdin ends it (exit 0); a bad frame (ProtocolError) or a parent that stopped
// reading ends it with exit 1. The data is loaded once; the backend and the model are kept from
// task to task, since the process lives for the whole federation and LibTorch takes 0.3 s to start.
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/net/frame.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/trust/contract.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <limits>
#include <new>
#include <tuple>
#include <unistd.h>
#include <utility>

namespace fedl::cmd {

namespace {

// Model files larger than this are refused before any memory is allocated for them.
constexpr std::uint64_t default_max_model_bytes = std::uint64_t{2} << 30;

struct WorkerOptions
{
  DataFlags data;
  ComputeOptions compute;
  std::optional<std::filesystem::path> torchscript;
  std::string model_policy = "inspect";
  std::optional<std::string> pin_model;
  std::uint64_t max_model_bytes = default_max_model_bytes;
  SandboxFlags sandbox;
  std::string role = "the trainer"; // or "the evaluator", for messages
  std::string metrics_set = "basic";
  // fedl join --eval-data: each task's model is evaluated on it before training, laid out as
  // --data is.
  std::optional<std::filesystem::path> eval_data;
  core::DataOptions eval_options() const
  {
    auto flags = data;
    flags.data = *eval_data;
    return flags.to_options();
  }
};

// The parent stopped reading: nothing more can be said to it.
struct OutputGone
{
  std::string message;
};

class Worker
{
public:
  Worker(const WorkerOptions& opt, int out_fd)
    : m_opt(opt), m_out(out_fd), m_data(core::load_dataset(opt.data.to_options()))
  {
    FEDL_LOG_INFO("{}: {} samples of shape {}", opt.data.data.string(), m_data.size(), m_data.shape_string());
    if (opt.eval_data) {
      m_eval = core::load_dataset(opt.eval_options());
      FEDL_LOG_INFO("{}: {} samples to evaluate each task's model on", opt.eval_data->string(), m_eval->size());
    }
  }

  int serve()
  {
    core::FrameLimits limits;
    limits.allow(core::FrameType::task, m_opt.max_model_bytes).allow(core::FrameType::eval, m_opt.max_model_bytes);
    for (;;) {
      std::optional<core::Frame> frame;
      try {
        frame = core::read_frame(STDIN_FILENO, limits, std::move(m_spare));
      } catch (const core::ProtocolError& e) {
        FEDL_LOG_ERROR("worker: bad frame from the parent process: {}", e.what());
        return static_cast<int>(core::ExitCode::failure);
      }
      if (!frame) {
        FEDL_LOG_DEBUG("worker: end of input; exiting");
        return 0;
      }
      try {
        handle(*frame);
        // Nothing keeps a view of the model's bytes once a task is done (the backend copied them).
        m_spare = std::move(frame->body);
      } catch (const OutputGone& e) {
        FEDL_LOG_ERROR("worker: cannot answer the parent process ({}); exiting", e.message);
        return static_cast<int>(core::ExitCode::failure);
      } catch (const core::ProtocolError& e) {
        FEDL_LOG_ERROR("worker: bad frame from the parent process: {}", e.what());
        return static_cast<int>(core::ExitCode::failure);
      }
    }
  }

private:
  // Runs one frame's task; a failure becomes an ERROR frame and the worker goes on. The frame
  // names the failure's class (core/trust/contract.hpp) by the step that failed: the parent sends the
  // coordinator that class alone, and keeps the message, which may quote the site's data.
  void handle(const core::Frame& frame)
  {
    std::string message;
    auto code = core::ExitCode::failure;
    m_step = core::ReasonClass::internal;
    try {
      if (frame.type == core::FrameType::task) {
        train(frame);
      } else {
        evaluate(frame);
      }
      return;
    } catch (const OutputGone&) {
      throw;
    } catch (const core::ProtocolError&) {
      throw;
    } catch (const core::Error& e) {
      message = e.what();
      code = e.code();
    } catch (const std::bad_alloc&) {
      message = "out of memory";
      m_step = core::ReasonClass::internal;
    } catch (const std::exception& e) {
      message = e.what();
    }
    // A warning: the parent reports the failure; this process carries on.
    FEDL_LOG_WARN("worker: {} failed: {}", core::frame_type_name(frame.type), message);
    const auto cls = code == core::ExitCode::budget ? core::ReasonClass::budget : m_step;
    reply(core::FrameType::error, core::ChildError{message, static_cast<int>(code), cls}.to_header());
  }

  void train(const core::Frame& frame)
  {
    m_step = core::ReasonClass::bad_settings;
    // The parent hashed the body it sends (fedl join); without a hash it is computed here.
    const auto task = core::TrainTask::from_header(frame.header);
    const auto round = task.round;
    const auto seed = task.seed;
    const auto& settings = task.training;
    const auto dp = dp_plan(settings, m_data.size());
    if (dp && dp->delta * static_cast<double>(m_data.size()) >= 1) {
      // Past 1/n, (epsilon, delta)-DP allows releasing a record outright: no epsilon means anything.
      throw core::UsageError("DP-SGD delta {:g} is not below 1/{} (one over the number of samples)", dp->delta,
                             m_data.size());
    }
    check_budget(task.budget, dp);
    // fedl join held the model to the site's contract already: what fails from here is the site's
    // data against it (a label past the model's classes, another feature count).
    m_step = core::ReasonClass::data_mismatch;
    auto m = open(frame.body, fmt::format("the round {} model", round), seed, task.base_sha256);
    m_base = update_base(m, std::move(m_base));
    // The global model as it came, on the site's validation data: the federated evaluation.
    std::optional<core::EvalResult> evaluation;
    if (m_eval) {
      evaluation = evaluate_model(m, *m_eval, default_eval_batch_size, m_metrics_set);
      FEDL_LOG_INFO("round {}: the global model on {} validation samples: accuracy {:.4f}, loss {:.4f}", round,
                    evaluation->samples, evaluation->accuracy, evaluation->loss);
    }
    const auto t0 = uptime_seconds();
    const auto result = train_model(
      m, m_data, settings, seed, [&](std::uint32_t epoch, std::uint64_t, std::uint64_t, double loss, bool end) {
        if (end) {
          FEDL_LOG_DEBUG("round {}: epoch {}/{}: loss {:.4f}", round, epoch, settings.epochs, loss);
        }
        return true;
      });
    const double seconds = uptime_seconds() - t0;
    auto update = make_update(m, m_base, m_data.size(), settings.epochs, result.loss, dp, std::move(m_update));
    update.metadata["fedl.round"] = std::to_string(round);

    // The update file's bytes go straight into the frame body, as write_safetensors lays them out.
    const auto views = update.views();
    const auto order = core::serialize_order(views);
    const auto head = core::safetensors_header(order, update.metadata);
    std::vector<std::span<const std::byte>> body{core::as_bytes(head)};
    for (const auto* t : order) {
      body.push_back(t->data);
    }
    FEDL_LOG_INFO("round {}: trained {} for {} on {}: loss {:.4f}, {:.1f} s", round, m.arch,
                  core::count_of(settings.epochs, "epoch"), core::count_of(m_data.size(), "sample"), result.loss,
                  seconds);
    m_model.emplace(std::move(m));
    core::TrainResult done{round, m_data.size(), result.steps, seconds, std::nullopt, std::nullopt, evaluation};
    if (dp) {
      done.dp = dp->to_json(); // and no loss: it was computed on the private data without noise
    } else {
      done.loss = result.loss;
    }
    m_step = core::ReasonClass::internal;
    reply(core::FrameType::update, done.to_header(), body);
    m_update = std::move(update.tensors);
  }

  // A task's "budget" (the site's --max-epsilon): refuses, before training, a run that would take
  // the site's account past it. The parent writes the account; this only projects.
  static void check_budget(const std::optional<nlohmann::json>& budget, const std::optional<core::DpSgdReport>& dp)
  {
    if (!budget) {
      return;
    }
    const auto& b = *budget;
    const double max_epsilon = b["max_epsilon"].get<double>();
    const double delta = b["delta"].get<double>();
    if (!dp) {
      throw core::Error(core::ExitCode::budget,
                        "the task asks for training without DP-SGD, which this site's --max-epsilon {} does not allow",
                        max_epsilon);
    }
    const auto accountant = core::accountant_from_flag(b["accountant"].get<std::string>(), "the task's accountant");
    auto account = core::PrivacyAccount::from_json(b["spent"], "the task's budget");
    const double before = account.epsilon(delta, accountant).epsilon;
    dp->add_to(account);
    const double after = account.epsilon(delta, accountant).epsilon;
    if (after > max_epsilon) {
      throw core::Error(
        core::ExitCode::budget,
        "this task's DP-SGD ({} steps at sample rate {:.4g}, noise multiplier {:g}) would take the site's "
        "epsilon from {:.4g} to {:.4g} at delta {:g}, past its --max-epsilon {:g}",
        dp->steps, dp->sample_rate, dp->noise_multiplier, before, after, delta, max_epsilon);
    }
  }

  void evaluate(const core::Frame& frame)
  {
    auto m = open(frame.body, "the model to evaluate", 0);
    const auto result = evaluate_model(m, m_data, default_eval_batch_size, m_metrics_set);
    FEDL_LOG_INFO("evaluated {} on {} samples: accuracy {:.4f}, loss {:.4f}", m.arch, result.samples, result.accuracy,
                  result.loss);
    m_model.emplace(std::move(m));
    reply(core::FrameType::result, result.to_header());
  }

  // Opens the model in `bytes` on the backend (loaded on first use), reusing the last model.
  OpenedModel open(std::span<const std::byte> bytes, std::string what, std::uint64_t seed,
                   std::optional<std::string> sha256 = std::nullopt)
  {
    if (m_backend == nullptr) {
      std::tie(m_backend, m_device) = open_backend(m_opt.compute);
      FEDL_LOG_DEBUG("worker: computing on {}", m_device);
    }
    ModelSource src;
    src.model_bytes = ModelBytes{bytes, std::move(what), std::move(sha256)};
    src.torchscript = m_opt.torchscript;
    src.policy.kind = ModulePolicy::parse(m_opt.model_policy);
    src.policy.pin = m_opt.pin_model;
    src.seed = seed;
    // The kept model is taken over or dropped whatever happens: after a failure half-way its
    // weights are in no known state.
    std::optional<OpenedModel> previous = std::exchange(m_model, std::nullopt);
    return open_model(*m_backend, m_device, src, m_data, previous ? &*previous : nullptr);
  }

  void reply(core::FrameType type, const nlohmann::json& header, std::span<const std::span<const std::byte>> body = {})
  {
    try {
      core::write_frame(m_out, type, header, body);
    } catch (const core::Error& e) {
      throw OutputGone{e.what()};
    }
  }

  const WorkerOptions& m_opt;
  int m_out;
  core::Dataset m_data;
  std::optional<core::Dataset> m_eval; // --eval-data
  core::MetricsSet m_metrics_set = *core::parse_metrics_set(m_opt.metrics_set);
  const backends::Backend* m_backend = nullptr;
  std::string m_device;
  std::optional<OpenedModel> m_model;
  std::vector<std::byte> m_spare; // the last frame's body, for the next one
  // The last task's base weights and update, whose buffers the next task reuses: a model-sized
  // buffer freed and allocated again comes back as fresh pages, faulted in and zeroed every round.
  UpdateBase m_base;
  std::vector<core::OwnedTensor> m_update;
  core::ReasonClass m_step = core::ReasonClass::internal; // the class of a failure at this step
};

int
run_worker(const WorkerOptions& opt)
{
  // First of all: the data, the backends, each model and module are opened inside it.
  auto policy = opt.sandbox.policy(opt.role);
  policy.read = core::dataset_files(opt.data.to_options());
  if (opt.eval_data) {
    const auto files = core::dataset_files(opt.eval_options());
    policy.read.insert(policy.read.end(), files.begin(), files.end());
  }
  if (opt.torchscript) {
    policy.read.push_back(*opt.torchscript);
  }
  enter_trainer_sandbox(std::move(policy));
  // A parent that has gone must be a write error (exit 1), not a silent death by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  // Frames go to a private copy of stdout, and fd 1 becomes stderr: a stray print from a library
  // cannot then corrupt the frame stream.
  const int out = ::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
  if (out < 0 || ::dup2(STDERR_FILENO, STDOUT_FILENO) < 0) {
    throw core::Error("fedl __worker needs a pipe on stdout to answer on: {}", std::strerror(errno));
  }
  Worker worker(opt, out);
  const int rc = worker.serve();
  ::close(out);
  return rc;
}

} // namespace

Command
add_worker(CLI::App& parent)
{
  auto opt = std::make_shared<WorkerOptions>();
  auto* app = parent.add_subcommand("__worker", "Train and evaluate models sent as frames on stdin (for join/serve)");
  app->group(""); // hidden: started by fedl itself
  add_data_options(*app, opt->data);
  app->add_option("--torchscript", opt->torchscript, "TorchScript module whose weights the tasks' models hold")
    ->type_name("FILE");
  app->add_option("--max-model-bytes", opt->max_model_bytes, "Largest model file accepted in a frame")
    ->capture_default_str()
    ->check(CLI::PositiveNumber)
    ->type_name("N");
  add_compute_options(*app, opt->compute);
  add_sandbox_options(*app, opt->sandbox);
  app->add_option("--role", opt->role, "What it is, for messages")->capture_default_str();
  app->add_option("--model-policy", opt->model_policy, "What it trains of a TorchScript module (fedl join's)")
    ->capture_default_str();
  app->add_option("--pin-model", opt->pin_model, "The SHA-256 of the only module it trains (fedl join's)");
  add_metrics_set_option(*app, opt->metrics_set, "What an evaluation measures");
  app->add_option("--eval-data", opt->eval_data, "Evaluate each task's model on this data before training")
    ->type_name("PATH");
  return {app, [opt] { return run_worker(*opt); }};
}

} // namespace fedl::cmd
