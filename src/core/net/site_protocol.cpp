// SPDX-License-Identifier: Apache-2.0
#include "core/net/site_protocol.hpp"

#include "core/util/text.hpp"

#include <fmt/format.h>

namespace fedl::core {

namespace {

using json = nlohmann::json;

// The value of `key` if it is an object (or absent: null); else a ProtocolError.
json
header_object(const json& header, const char* key)
{
  const auto it = header.find(key);
  if (it == header.end() || it->is_null()) {
    return nullptr;
  }
  if (!it->is_object()) {
    throw ProtocolError(fmt::format("frame header field {} is not an object", key));
  }
  return *it;
}

std::optional<std::uint64_t>
optional_uint(const json& header, const char* key)
{
  return header.contains(key) ? std::optional(header_uint(header, key)) : std::nullopt;
}

} // namespace

json
Hello::to_header() const
{
  return {{"site", site}, {"version", version}};
}

Hello
Hello::from_header(const json& h)
{
  return {header_string(h, "site"), header_uint(h, "version", protocol_version)};
}

json
Welcome::to_header() const
{
  json h = {{"round", round},
            {"rounds", rounds},
            {"heartbeat", heartbeat},
            {"ca_fingerprint", ca_fingerprint},
            {"update_signature", update_signature}};
  if (!privacy.is_null()) {
    h["privacy"] = privacy;
  }
  return h;
}

Welcome
Welcome::from_header(const json& h)
{
  return {header_uint(h, "round"),
          header_uint(h, "rounds"),
          header_number(h, "heartbeat", 5.0),
          header_string(h, "ca_fingerprint"),
          header_object(h, "privacy"),
          header_uint(h, "update_signature", 1)};
}

json
Task::to_header() const
{
  json h = {{"round", round}, {"attempt", attempt},   {"task", task},
            {"seed", seed},   {"training", training}, {"ledger_head", ledger_head}};
  if (deadline) {
    h["deadline"] = *deadline;
  }
  if (base_sha256) {
    h["base_sha256"] = *base_sha256;
  }
  if (!secure_aggregation.is_null()) {
    h["secure_aggregation"] = secure_aggregation;
  }
  return h;
}

Task
Task::from_header(const json& h)
{
  Task t;
  t.round = header_uint(h, "round");
  t.attempt = header_uint(h, "attempt");
  t.task = header_uint(h, "task");
  if (h.contains("deadline")) {
    t.deadline = header_number(h, "deadline", 0.0);
  }
  t.seed = header_uint(h, "seed");
  if (auto training = header_object(h, "training"); !training.is_null()) {
    t.training = std::move(training);
  }
  if (h.contains("base_sha256")) {
    t.base_sha256 = header_string(h, "base_sha256");
  }
  t.ledger_head = header_object(h, "ledger_head");
  t.secure_aggregation = header_object(h, "secure_aggregation");
  return t;
}

json
Update::to_header() const
{
  json h = {{"round", round}, {"task", task}, {"attempt", attempt}, {"metrics", metrics}};
  if (sandbox) {
    h["sandbox"] = sandbox_level_name(*sandbox);
  }
  if (model_policy) {
    h["model_policy"] = model_policy_name(*model_policy);
  }
  return h;
}

Update
Update::from_header(const json& h)
{
  Update u;
  u.round = header_uint(h, "round");
  u.task = header_uint(h, "task");
  u.attempt = header_uint(h, "attempt");
  if (auto metrics = header_object(h, "metrics"); !metrics.is_null()) {
    u.metrics = std::move(metrics);
  }
  u.sandbox = header_sandbox(h, "sandbox");
  u.model_policy = header_model_policy(h, "model_policy");
  return u;
}

json
bounded_metrics(const json& metrics)
{
  constexpr std::size_t max_entries = 32;
  json out = json::object();
  if (!metrics.is_object()) {
    return out;
  }
  for (const auto& [key, value] : metrics.items()) {
    if (out.size() >= max_entries) {
      break;
    }
    if (key.size() > 64) {
      continue;
    }
    if (value.is_number() || value.is_boolean()) {
      out[key] = value;
    } else if (value.is_string()) {
      out[key] = valid_utf8(value.get<std::string>(), 200);
    }
  }
  return out;
}

json
Done::to_header() const
{
  return {{"rounds", rounds}, {"reason", reason}, {"ledger_head", ledger_head}};
}

Done
Done::from_header(const json& h)
{
  return {header_uint(h, "rounds"), header_string(h, "reason"), header_object(h, "ledger_head")};
}

json
ErrorReport::to_header() const
{
  json h = {{"message", message}, {"code", code}};
  if (task) {
    h["task"] = *task;
  }
  if (round) {
    h["round"] = *round;
  }
  if (!reason_class.empty()) {
    h["class"] = reason_class;
  }
  if (replaced) {
    h["replaced"] = true;
  }
  return h;
}

ErrorReport
ErrorReport::from_header(const json& h)
{
  ErrorReport e;
  e.message = header_string(h, "message", "(no message)");
  e.code = header_int(h, "code", 1);
  e.task = optional_uint(h, "task");
  e.round = optional_uint(h, "round");
  e.reason_class = header_string(h, "class");
  e.replaced = header_bool(h, "replaced");
  return e;
}

} // namespace fedl::core
