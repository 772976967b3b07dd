// SPDX-License-Identifier: Apache-2.0
// The trainer child's protocol: the frames `fedl __worker` reads on its stdin and answers on its
// stdout, one type per message with its one encoder and decoder, for both sides (the worker in
// cmd/worker.cpp; fedl join's session and fedl serve's evaluator through TrainerClient).
//
//   TASK    TrainTask header, body: a fedl model file      -> UPDATE  TrainResult header, body:
//                                                              the update file (unsigned)
//   EVAL    {} , body: a fedl model file                   -> RESULT  EvalResult header
//   either, failed                                         -> ERROR   ChildError header
//
// A field missing or of the wrong type is a ProtocolError (the peer is fedl itself: a violation,
// not a task that failed); a task's "training" is read as fedl.json's (UsageError).
#pragma once

#include "core/config/config.hpp"
#include "core/math/metrics.hpp"
#include "core/net/child.hpp"
#include "core/net/frame.hpp"
#include "core/trust/contract.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace fedl::core {

struct TrainTask
{
  std::uint64_t round = 0;
  std::uint64_t seed = 0;
  TrainingConfig training;
  std::optional<std::string> base_sha256; // the model body's SHA-256, if the sender hashed it
  // The site's --max-epsilon: {"max_epsilon": E, "delta": D, "spent": its RDP account}; the
  // worker refuses (ExitCode::budget) a run that would take the account past E.
  std::optional<nlohmann::json> budget;

  nlohmann::json to_header() const;
  static TrainTask from_header(const nlohmann::json& header);
};

struct EvalResult
{
  double accuracy = 0;
  double loss = 0;
  std::uint64_t samples = 0;
  double seconds = 0;
  // With --metrics-set classification: the confusion matrix (and ROC AUC), checked on receipt.
  std::optional<ClassificationCounts> classification;

  nlohmann::json to_header() const;
  static EvalResult from_header(const nlohmann::json& header);
  // What fedl eval --json and a round entry's evaluation show: accuracy, loss, samples and, with
  // classification counts, their metrics (ClassificationCounts::metrics, classes listed one by
  // one up to `per_class_limit`).
  nlohmann::json summary(std::int64_t per_class_limit = max_metric_classes) const;
};

struct TrainResult
{
  std::uint64_t round = 0;
  std::uint64_t num_samples = 0;
  std::uint64_t steps = 0;
  double seconds = 0;
  std::optional<double> loss;       // absent under DP-SGD (computed on private data, no noise)
  std::optional<nlohmann::json> dp; // DpSgdReport::to_json of the run, under DP-SGD
  // fedl join --eval-data: the task's model (the global model, before training) on the site's
  // validation data.
  std::optional<EvalResult> evaluation;

  nlohmann::json to_header() const;
  static TrainResult from_header(const nlohmann::json& header);
};

// A task that failed: the worker's message (which may quote the site's data: it stays at the
// site), the exit code fedl would give, and the class of the step that failed.
struct ChildError
{
  std::string message;
  int code = 1;
  ReasonClass cls = ReasonClass::internal;

  nlohmann::json to_header() const;
  static ChildError from_header(const nlohmann::json& header);
};

// The parent's side: a `fedl __worker` child started at the first request and again after it
// died or was killed.
class TrainerClient
{
public:
  // `via`: start the child through a fork server rather than as a program of its own.
  explicit TrainerClient(std::vector<std::string> argv, std::optional<ForkServerRef> via = std::nullopt)
    : m_argv(std::move(argv)), m_via(std::move(via))
  {
  }

  // Starts the child unless it is running; its pid.
  pid_t start();
  // Sends one request and waits for its answer. Error (the child died, or its pipe broke) and
  // ProtocolError (a bad answer) come out as exceptions; the child is then killed. `sent` runs
  // once the model is written (its buffer may go), before the wait for the update. `reuse`: an
  // earlier update's buffer to read this one into (no fresh pages for it).
  std::variant<std::pair<TrainResult, std::vector<std::byte>>, ChildError> train(const TrainTask& task,
                                                                                 std::span<const std::byte> model,
                                                                                 std::uint64_t max_update_bytes,
                                                                                 const std::function<void()>& sent = {},
                                                                                 std::vector<std::byte> reuse = {});
  std::variant<EvalResult, ChildError> evaluate(std::span<const std::byte> model);
  // Ends the child now (SIGKILL, reaped). Idempotent.
  void kill();
  // Ends the child gently (end of its input, then SIGKILL after 2 s): an idle trainer's memory
  // goes back to the system. The next request starts a new one.
  void stop() { m_child.reset(); }

private:
  Frame request(FrameType type, const nlohmann::json& header, std::span<const std::byte> body,
                const FrameLimits& limits, const std::function<void()>& sent, std::vector<std::byte> reuse = {});

  std::vector<std::string> m_argv;
  std::optional<ForkServerRef> m_via;
  std::optional<WorkerProcess> m_child;
};

} // namespace fedl::core
