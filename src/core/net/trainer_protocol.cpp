// SPDX-License-Identifier: Apache-2.0
#include "core/net/trainer_protocol.hpp"

#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>

namespace fedl::core {

namespace {

using json = nlohmann::json;

// A required unsigned integer of a header from fedl itself.
std::uint64_t
required_uint(const json& header, const char* key, FrameType type)
{
  if (!header.contains(key)) {
    throw ProtocolError(
      fmt::format("{} frame header has no unsigned integer \"{}\": {}", frame_type_name(type), key, header.dump()));
  }
  return header_uint(header, key);
}

double
required_number(const json& header, const char* key, FrameType type)
{
  if (!header.contains(key)) {
    throw ProtocolError(fmt::format("{} frame header has no number \"{}\"", frame_type_name(type), key));
  }
  return header_number(header, key, 0.0);
}

} // namespace

json
TrainTask::to_header() const
{
  json h = {{"round", round}, {"seed", seed}, {"training", to_json(training)}};
  if (base_sha256) {
    h["base_sha256"] = *base_sha256;
  }
  if (budget) {
    h["budget"] = *budget;
  }
  return h;
}

TrainTask
TrainTask::from_header(const json& h)
{
  TrainTask t;
  t.round = required_uint(h, "round", FrameType::task);
  t.seed = required_uint(h, "seed", FrameType::task);
  if (const auto it = h.find("base_sha256"); it != h.end() && it->is_string() && it->get<std::string>().size() == 64) {
    t.base_sha256 = it->get<std::string>();
  }
  if (const auto it = h.find("budget"); it != h.end()) {
    const auto& b = *it;
    if (!b.is_object() || !b.contains("max_epsilon") || !b["max_epsilon"].is_number() || !b.contains("delta") ||
        !b["delta"].is_number() || !b.contains("spent") || !b.contains("accountant") || !b["accountant"].is_string()) {
      throw ProtocolError(fmt::format("TASK frame has a malformed budget: {}", b.dump()));
    }
    t.budget = b;
  }
  // Last: a bad setting is a task that fails (UsageError), not a protocol violation.
  t.training = training_from_json(h.value("training", json::object()), "the task");
  return t;
}

json
TrainResult::to_header() const
{
  json h = {{"round", round}, {"num_samples", num_samples}, {"steps", steps}, {"seconds", seconds}};
  if (loss) {
    h["loss"] = *loss;
  }
  if (dp) {
    h["dp"] = *dp;
  }
  if (evaluation) {
    h["evaluation"] = evaluation->to_header();
  }
  return h;
}

TrainResult
TrainResult::from_header(const json& h)
{
  TrainResult r;
  r.round = header_uint(h, "round");
  r.num_samples = required_uint(h, "num_samples", FrameType::update);
  r.steps = required_uint(h, "steps", FrameType::update);
  r.seconds = header_number(h, "seconds", 0.0);
  if (h.contains("loss")) {
    r.loss = header_number(h, "loss", 0.0);
  }
  if (const auto it = h.find("dp"); it != h.end()) {
    r.dp = *it;
  }
  if (const auto it = h.find("evaluation"); it != h.end()) {
    r.evaluation = EvalResult::from_header(*it);
  }
  return r;
}

json
EvalResult::to_header() const
{
  json h = {{"accuracy", accuracy}, {"loss", loss}, {"samples", samples}, {"seconds", seconds}};
  if (classification) {
    h["classification"] = classification->to_counts();
  }
  return h;
}

json
EvalResult::summary(std::int64_t per_class_limit) const
{
  json j = {{"accuracy", accuracy}, {"loss", loss}, {"samples", samples}};
  if (classification) {
    j.update(classification->metrics(per_class_limit));
  }
  return j;
}

EvalResult
EvalResult::from_header(const json& h)
{
  EvalResult r;
  r.accuracy = required_number(h, "accuracy", FrameType::result);
  r.loss = required_number(h, "loss", FrameType::result);
  r.samples = required_uint(h, "samples", FrameType::result);
  r.seconds = header_number(h, "seconds", 0.0);
  if (const auto it = h.find("classification"); it != h.end()) {
    r.classification = ClassificationCounts::from_counts(*it, r.samples, "the evaluator's result");
  }
  return r;
}

json
ChildError::to_header() const
{
  return {{"message", message}, {"code", code}, {"class", reason_class_name(cls)}};
}

ChildError
ChildError::from_header(const json& h)
{
  ChildError e;
  const auto it = h.find("message");
  e.message = it != h.end() && it->is_string() ? it->get<std::string>() : std::string("the trainer failed");
  e.code = static_cast<int>(header_int(h, "code", 1));
  const auto c = h.find("class");
  e.cls = e.code == static_cast<int>(ExitCode::budget) ? ReasonClass::budget
          : c != h.end() && c->is_string()             ? reason_class_from_name(c->get<std::string>())
                                                       : ReasonClass::internal;
  return e;
}

pid_t
TrainerClient::start()
{
  if (!m_child || !m_child->running()) {
    if (m_child) {
      FEDL_LOG_WARN("the trainer ended ({}); starting it again", m_child->exit_description().value_or("?"));
    }
    m_child.reset();
    m_child.emplace(m_argv, m_via);
  }
  return m_child->pid();
}

Frame
TrainerClient::request(FrameType type, const json& header, std::span<const std::byte> body, const FrameLimits& limits,
                       const std::function<void()>& sent, std::vector<std::byte> reuse)
{
  start();
  try {
    m_child->send(type, header, std::span(&body, 1));
    if (sent) {
      sent();
    }
    return m_child->receive(limits, std::move(reuse));
  } catch (...) {
    kill();
    throw;
  }
}

std::variant<std::pair<TrainResult, std::vector<std::byte>>, ChildError>
TrainerClient::train(const TrainTask& task, std::span<const std::byte> model, std::uint64_t max_update_bytes,
                     const std::function<void()>& sent, std::vector<std::byte> reuse)
{
  FrameLimits limits;
  limits.allow(FrameType::update, max_update_bytes).allow(FrameType::error);
  auto reply = request(FrameType::task, task.to_header(), model, limits, sent, std::move(reuse));
  try {
    if (reply.type == FrameType::error) {
      return ChildError::from_header(reply.header);
    }
    return std::pair{TrainResult::from_header(reply.header), std::move(reply.body)};
  } catch (...) {
    kill();
    throw;
  }
}

std::variant<EvalResult, ChildError>
TrainerClient::evaluate(std::span<const std::byte> model)
{
  FrameLimits limits;
  limits.allow(FrameType::result).allow(FrameType::error);
  const auto reply = request(FrameType::eval, json::object(), model, limits, {});
  try {
    if (reply.type == FrameType::error) {
      return ChildError::from_header(reply.header);
    }
    return EvalResult::from_header(reply.header);
  } catch (...) {
    kill();
    throw;
  }
}

void
TrainerClient::kill()
{
  if (m_child) {
    m_child->kill();
  }
}

} // namespace fedl::core
