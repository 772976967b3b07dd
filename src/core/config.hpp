// SPDX-License-Identifier: Apache-2.0
// fedl.json: the whole configuration of a federation workspace. Loading rejects unknown keys by
// name and wrong types with the path of the field, so a typo never passes silently.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedl::core {

struct ModelConfig
{
  std::string arch;                       // zoo spec, or "torchscript"
  std::vector<std::int64_t> input_shape;  // e.g. {64} or {1, 28, 28}
  std::int64_t classes = 0;
  std::optional<std::string> torchscript; // file name inside the workspace (model.pt)
};

// Hyperparameters of one local training run: fedl train's options, fedl.json's "training",
// a round's task.
struct TrainingConfig
{
  static constexpr std::uint32_t max_epochs = 100000;
  static constexpr std::uint32_t max_batch_size = 1U << 24;

  std::uint32_t epochs = 1;
  std::uint32_t batch_size = 32;
  double lr = 0.01;
  std::string optimizer = "sgd";
  double momentum = 0.0;
  double prox_mu = 0.0;
};

struct ServerOptimizerConfig
{
  double lr = 1.0;
  double momentum = 0.9;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double tau = 1e-3;
};

struct FederationConfig
{
  int version = 1;
  ModelConfig model;
  std::vector<std::string> clients;
  std::string listen = "0.0.0.0:7443";
  std::vector<std::string> server_names{"localhost", "127.0.0.1"};
  // fedl serve's round policy (flags override them): the quorum of updates a round needs (0: two,
  // or one in a federation of one site), the sites asked per round (0: all connected), the
  // seconds a round may take, and how long to wait for a quorum of sites to connect (0: forever).
  std::uint32_t min_clients = 0;
  std::uint32_t clients_per_round = 0;
  double round_timeout = 600;
  double wait_timeout = 0;
  std::uint32_t rounds = 10;
  std::string strategy = "fedavg";
  ServerOptimizerConfig server_optimizer;
  TrainingConfig training;
  std::uint64_t seed = 0;
  std::uint32_t valid_days = 365;
};

nlohmann::json to_json(const FederationConfig& config);
nlohmann::json to_json(const TrainingConfig& training);
// Throws UsageError naming the first value out of the range fedl train's options accept.
void check_training(const TrainingConfig& training);
// Throws UsageError (exit 2) naming `what` (the file) and the field path for unknown keys,
// missing required fields and wrong types.
FederationConfig config_from_json(const nlohmann::json& j, const std::string& what);

FederationConfig load_config(const std::filesystem::path& path);
// The canonical text written to fedl.json (2-space indented, keys sorted, final newline).
std::string config_text(const FederationConfig& config);

} // namespace fedl::core
