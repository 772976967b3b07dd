// SPDX-License-Identifier: Apache-2.0
// The trainer child's messages (core/net/trainer_protocol): each one read back as written, and a
// field missing or of the wrong type refused as a protocol violation, a bad setting as a usage
// error (a task that fails, not a broken child).
#include "core/net/trainer_protocol.hpp"

#include "core/util/error.hpp"

#include <doctest/doctest.h>

using namespace fedl::core;
using json = nlohmann::json;

namespace {
// A header as the other side reads it: through its text (a literal 1 is then unsigned).
json
wire(const json& j)
{
  return json::parse(j.dump());
}
} // namespace

TEST_SUITE_BEGIN("trainer_protocol");

TEST_CASE("trainer protocol: every message reads back as written")
{
  TrainTask t;
  t.round = 7;
  t.seed = 8;
  t.training.epochs = 3;
  t.training.dp = DpSgdConfig{1.1, 1.0, 1e-5};
  t.base_sha256 = std::string(64, 'a');
  t.budget = json{{"max_epsilon", 3.0}, {"delta", 1e-5}, {"accountant", "pld"}, {"spent", json::object()}};
  // Through text, as over the pipe.
  const auto back = TrainTask::from_header(json::parse(t.to_header().dump()));
  CHECK(back.round == 7);
  CHECK(back.seed == 8);
  CHECK(back.training.epochs == 3);
  CHECK(back.training.dp == t.training.dp);
  CHECK(back.base_sha256 == t.base_sha256);
  CHECK(back.budget == t.budget);

  TrainResult r{7, 100, 4, 0.5, 0.25, std::nullopt, std::nullopt};
  auto rb = TrainResult::from_header(json::parse(r.to_header().dump()));
  CHECK(rb.num_samples == 100);
  CHECK(rb.steps == 4);
  CHECK(rb.loss == 0.25);
  CHECK_FALSE(rb.dp);
  CHECK_FALSE(rb.evaluation);
  // With the site's evaluation of the global model (join --eval-data).
  r.evaluation = EvalResult{0.75, 0.5, 40, 0.01, std::nullopt};
  rb = TrainResult::from_header(json::parse(r.to_header().dump()));
  REQUIRE(rb.evaluation);
  CHECK(rb.evaluation->accuracy == 0.75);
  CHECK(rb.evaluation->samples == 40);

  EvalResult e{0.9, 0.3, 358, 0.01, std::nullopt};
  auto eb = EvalResult::from_header(json::parse(e.to_header().dump()));
  CHECK(eb.accuracy == 0.9);
  CHECK(eb.samples == 358);
  CHECK_FALSE(eb.classification);
  // With classification counts: checked against the samples on receipt.
  ClassificationCounts counts(2);
  counts.add(std::vector<float>{0.9F, 0.1F, 0.3F, 0.7F}, std::vector<std::int64_t>{0, 1});
  e.samples = 2;
  e.classification = counts;
  eb = EvalResult::from_header(json::parse(e.to_header().dump()));
  REQUIRE(eb.classification);
  CHECK(eb.classification->metrics() == counts.metrics());
  auto h = e.to_header();
  h["samples"] = 3;
  CHECK_THROWS_WITH(EvalResult::from_header(json::parse(h.dump())), doctest::Contains("do not add up"));

  const ChildError c{"line 4: label 3", 2, ReasonClass::data_mismatch};
  const auto cb = ChildError::from_header(json::parse(c.to_header().dump()));
  CHECK(cb.message == c.message);
  CHECK(cb.code == 2);
  CHECK(cb.cls == ReasonClass::data_mismatch);
  // The budget's exit code is the budget class, whatever the class field says.
  CHECK(ChildError::from_header(wire({{"message", "x"}, {"code", 4}, {"class", "internal"}})).cls ==
        ReasonClass::budget);
  CHECK(ChildError::from_header(wire({{"code", 1}, {"class", "no such class"}})).cls == ReasonClass::internal);
}

TEST_CASE("trainer protocol: a malformed message is a protocol violation, a bad setting a failed task")
{
  CHECK_THROWS_WITH_AS(TrainTask::from_header(wire({{"seed", 1}})), doctest::Contains("no unsigned integer \"round\""),
                       ProtocolError);
  CHECK_THROWS_AS(TrainTask::from_header(wire({{"round", -1}, {"seed", 1}})), ProtocolError);
  CHECK_THROWS_AS(TrainTask::from_header(wire({{"round", 1}, {"seed", 1.5}})), ProtocolError);
  CHECK_THROWS_WITH_AS(TrainTask::from_header(wire({{"round", 1}, {"seed", 1}, {"budget", {{"delta", 1e-5}}}})),
                       doctest::Contains("malformed budget"), ProtocolError);
  CHECK_THROWS_WITH_AS(TrainTask::from_header(wire({{"round", 1}, {"seed", 1}, {"training", {{"epoch", 3}}}})),
                       doctest::Contains("unknown key training.epoch"), UsageError);
  // A base hash that is not one is left for the worker to compute.
  CHECK_FALSE(TrainTask::from_header(wire({{"round", 1}, {"seed", 1}, {"base_sha256", "short"}})).base_sha256);

  CHECK_THROWS_AS(TrainResult::from_header(wire({{"steps", 1}})), ProtocolError);
  CHECK_THROWS_AS(TrainResult::from_header(wire({{"num_samples", "many"}, {"steps", 1}})), ProtocolError);
  CHECK_THROWS_AS(EvalResult::from_header(wire({{"loss", 0.1}, {"samples", 3}})), ProtocolError);
  CHECK_THROWS_AS(EvalResult::from_header(wire({{"accuracy", "high"}, {"loss", 0.1}, {"samples", 3}})), ProtocolError);
}
