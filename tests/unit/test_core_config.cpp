// SPDX-License-Identifier: Apache-2.0
#include "core/config/config.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

using namespace fedl::core;
using fedl::test::TempDir;
using fedl::test::write_file;

namespace {

std::string
error_of(const nlohmann::json& j)
{
  try {
    (void)config_from_json(j, "fedl.json");
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(accepted)";
}

FederationConfig
sample()
{
  FederationConfig c;
  c.model = {"mlp:64", {64}, 10, std::nullopt};
  c.clients = {"site-1", "site-2"};
  c.rounds = 5;
  c.strategy = "fedadam";
  c.training.lr = 0.05;
  return c;
}

} // namespace

TEST_SUITE_BEGIN("config");

TEST_CASE("core::config round-trips through JSON")
{
  const auto c = sample();
  const auto back = config_from_json(to_json(c), "fedl.json");
  CHECK(to_json(back) == to_json(c));
  CHECK(back.model.input_shape == std::vector<std::int64_t>{64});
  CHECK(back.clients == c.clients);
  CHECK(back.training.lr == 0.05);
  CHECK(config_text(c).back() == '\n');
}

TEST_CASE("core::config: the data contract is written only when known, and read back")
{
  auto c = sample();
  CHECK_FALSE(to_json(c).contains("data"));
  CHECK_FALSE(config_from_json(to_json(c), "fedl.json").data);
  c.data = DataContract{DataFormat::csv, false, "0", {}};
  const auto back = config_from_json(to_json(c), "fedl.json");
  CHECK(back.data == c.data);
  auto j = to_json(c);
  j["data"]["delimiter"] = ";";
  CHECK_THROWS_WITH_AS(config_from_json(j, "fedl.json"), doctest::Contains("unknown key data.'delimiter'"), UsageError);
}

TEST_CASE("core::config: secure_aggregation is written only when on, read back, and checked")
{
  auto c = sample();
  CHECK_FALSE(to_json(c).contains("secure_aggregation"));
  c.secure_aggregation = SecureAggregationConfig{0.6, 6, 0.5};
  const auto back = config_from_json(to_json(c), "fedl.json");
  REQUIRE(back.secure_aggregation);
  CHECK(*back.secure_aggregation == *c.secure_aggregation);
  auto j = to_json(c);
  j["secure_aggregation"]["threshold"] = 1.5; // neither a fraction nor a whole count of at least 2
  CHECK(error_of(j).find("secure_aggregation: threshold") != std::string::npos);
  j = to_json(c);
  j["secure_aggregation"]["range"] = 0;
  CHECK(error_of(j).find("secure_aggregation: range") != std::string::npos);
  j = to_json(c);
  j["secure_aggregation"]["neighbours"] = 41;
  CHECK(error_of(j).find("secure_aggregation: neighbours must be 2 to 40") != std::string::npos);
  j = to_json(c);
  j["secure_aggregation"]["degree"] = 4;
  CHECK(error_of(j).find("unknown key secure_aggregation.degree") != std::string::npos);
}

TEST_CASE("core::config rejects unknown keys by their path")
{
  auto j = to_json(sample());
  j["roudns"] = 3;
  CHECK(error_of(j).find("unknown key roudns") != std::string::npos);
  j = to_json(sample());
  j["training"]["learning_rate"] = 0.1;
  CHECK(error_of(j).find("unknown key training.learning_rate") != std::string::npos);
  j = to_json(sample());
  j["model"]["dropout"] = 0.5;
  CHECK(error_of(j).find("unknown key model.dropout") != std::string::npos);
}

TEST_CASE("core::config rejects training settings no site could train with")
{
  auto j = to_json(sample());
  j["training"]["optimizer"] = "Adam";
  CHECK(error_of(j) == "fedl.json: training: optimizer 'Adam' is not one of sgd, adam");
  j = to_json(sample());
  j["training"]["batch_size"] = 0;
  CHECK(error_of(j) == "fedl.json: training: batch_size 0 is outside 1..16777216");
  j = to_json(sample());
  j["training"]["momentum"] = 1.5;
  CHECK(error_of(j) == "fedl.json: training: momentum 1.5 is outside 0..1");
}

TEST_CASE("core::config reads DP-SGD in training and the federation's privacy, and checks their ranges")
{
  auto c = sample();
  CHECK_FALSE(to_json(c).contains("privacy")); // absent unless set: older files stay as they were
  CHECK_FALSE(to_json(c)["training"].contains("dp"));
  c.training.dp = DpSgdConfig{1.1, 0.5, 1e-6};
  c.privacy = PrivacyConfig{2.0, 1.3, 8.0, 1e-5};
  const auto back = config_from_json(to_json(c), "fedl.json");
  REQUIRE(back.training.dp);
  CHECK(*back.training.dp == *c.training.dp);
  CHECK(back.privacy == c.privacy);

  auto j = to_json(c);
  j["training"]["dp"]["noise_multiplier"] = 0;
  CHECK(error_of(j) == "fedl.json: training: dp.noise_multiplier must be a positive number, not 0");
  j = to_json(c);
  j["training"]["dp"]["delta"] = 1;
  CHECK(error_of(j) == "fedl.json: training: dp.delta must be between 0 and 1 (exclusive), not 1");
  j = to_json(c);
  j["training"]["dp"]["sigma"] = 1;
  CHECK(error_of(j).find("unknown key training.dp.sigma") != std::string::npos);
  j = to_json(c);
  j["training"]["dp"]["noise_multiplier"] = 1e-200; // epsilon would be infinite: nothing could record it
  CHECK(error_of(j).find("is too small: one step would spend an infinite epsilon") != std::string::npos);
  j = to_json(c);
  j["privacy"]["clip_norm"] = -1;
  CHECK(error_of(j) == "fedl.json: privacy: clip_norm must be a positive number, not -1");
  j = to_json(c);
  j["privacy"]["max_epsilon"] = -2;
  CHECK(error_of(j) == "fedl.json: privacy: max_epsilon must be a positive number, not -2");
  j = to_json(c);
  j["privacy"]["delta"] = 0;
  CHECK(error_of(j) == "fedl.json: privacy: delta must be between 0 and 1 (exclusive), not 0");
}

TEST_CASE("core::config rejects wrong types with the field path")
{
  auto j = to_json(sample());
  j["rounds"] = "ten";
  CHECK(error_of(j).find("rounds must be a non-negative integer, found string \"ten\"") != std::string::npos);
  j = to_json(sample());
  j["training"]["lr"] = "fast";
  CHECK(error_of(j).find("training.lr must be a number") != std::string::npos);
  j = to_json(sample());
  j["clients"] = {"a", 3};
  CHECK(error_of(j).find("clients must be an array of strings") != std::string::npos);
  j = to_json(sample());
  j["server"] = 1;
  CHECK(error_of(j).find("server must be an object") != std::string::npos);
  j = to_json(sample());
  j.erase("model");
  CHECK(error_of(j).find("model is missing") != std::string::npos);
  j = to_json(sample());
  j["version"] = 2;
  CHECK(error_of(j).find("version 2 is not supported") != std::string::npos);
  j = to_json(sample());
  j["rounds"] = -1;
  CHECK(error_of(j).find("rounds must be a non-negative integer") != std::string::npos);
  // Integers the field cannot hold are refused, not cut (4294967297 used to become 1).
  j = to_json(sample());
  j["rounds"] = 4294967297ULL;
  CHECK(error_of(j).find("rounds must be a non-negative integer from 0 to 4294967295, found number 4294967297") !=
        std::string::npos);
  j = to_json(sample());
  j["version"] = 4294967297LL;
  CHECK(error_of(j).find("version must be an integer from -2147483648 to 2147483647") != std::string::npos);
  j = to_json(sample());
  j["seed"] = 18446744073709551615ULL;
  CHECK(config_from_json(j, "fedl.json").seed == 18446744073709551615ULL);
}

TEST_CASE("core::load_config refuses a file nested deeper than fedl.json, before parsing it")
{
  TempDir dir;
  // 200000 levels: printing the value in the type error used to recurse once per level and
  // overflow the stack.
  const std::size_t depth = 200000;
  write_file(dir / "deep.json", "{\"version\":" + std::string(depth, '[') + std::string(depth, ']') + "}");
  CHECK_THROWS_WITH_AS(load_config(dir / "deep.json"), doctest::Contains("nests 200001 levels deep"), UsageError);
  write_file(dir / "nine.json", "{\"version\":[[[[[[[[1]]]]]]]]}");
  CHECK_THROWS_WITH_AS(load_config(dir / "nine.json"), doctest::Contains("nests 9 levels deep"), UsageError);
  write_file(dir / "fedl.json", config_text(sample()));
  CHECK(config_text(load_config(dir / "fedl.json")) == config_text(sample()));
}

TEST_SUITE_END();

TEST_CASE("core::config: one JSON form for the server optimizer, which also reads the older round-entry names")
{
  ServerOptimizer o;
  o.lr = 0.5;
  o.momentum = 0.8;
  o.tau = 0.01;
  const auto j = to_json(o);
  CHECK(j == nlohmann::json{{"lr", 0.5}, {"momentum", 0.8}, {"beta1", 0.9}, {"beta2", 0.99}, {"tau", 0.01}});
  CHECK(server_optimizer_from_json(j, "server_optimizer", "fedl.json") == o);
  // Round entries written before December 2026.
  const nlohmann::json old = {{"server_lr", 0.5}, {"server_momentum", 0.8}, {"beta1", 0.9}, {"beta2", 0.99},
                              {"tau", 0.01},      {"clip_norm", 2.0}};
  CHECK(server_optimizer_from_json(old, "options", "line 3", {"clip_norm"}) == o);
  CHECK_THROWS_WITH_AS(server_optimizer_from_json(old, "options", "line 3"),
                       doctest::Contains("line 3: unknown key options.clip_norm"), UsageError);
  CHECK_THROWS_WITH_AS(server_optimizer_from_json({{"lr", 1.0}, {"server_lr", 2.0}}, "options", "line 3"),
                       "line 3: options.lr and options.server_lr are the same setting: give one", UsageError);
  CHECK_THROWS_WITH_AS(server_optimizer_from_json({{"momentum", "high"}}, "server_optimizer", "fedl.json"),
                       doctest::Contains("fedl.json: server_optimizer.momentum must be a number"), UsageError);
  // Missing keys keep their defaults.
  CHECK(server_optimizer_from_json(nlohmann::json::object(), "server_optimizer", "fedl.json") == ServerOptimizer{});
}
