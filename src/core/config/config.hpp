// SPDX-License-Identifier: Apache-2.0
// fedl.json: the whole configuration of a federation workspace. Loading rejects unknown keys by
// name and wrong types with the path of the field, so a typo never passes silently.
#pragma once

#include "core/format/data_contract.hpp"
#include "core/math/accountant.hpp"
#include "core/math/aggregate.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedl::core {

struct ModelConfig
{
  std::string arch;                      // zoo spec, or "torchscript"
  std::vector<std::int64_t> input_shape; // e.g. {64} or {1, 28, 28}
  std::int64_t classes = 0;
  std::optional<std::string> torchscript; // file name inside the workspace (model.pt)
};

// Sample-level DP-SGD of a local training run (Abadi et al. 2016): Poisson sampling with rate
// batch_size / samples, each example's gradient clipped to max_grad_norm, Gaussian noise of
// standard deviation noise_multiplier × max_grad_norm on the sum; epsilon is reported at delta.
struct DpSgdConfig
{
  double noise_multiplier = 0;
  double max_grad_norm = 0;
  double delta = 1e-5;
  // How this process reports ε (train --accountant, join --accountant); not part of a task.
  Accountant accountant = Accountant::pld_v1;

  bool operator==(const DpSgdConfig&) const = default;
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
  std::optional<DpSgdConfig> dp; // "dp" in JSON; absent: no DP-SGD
};

// fedl.json's "privacy": client-level DP at the coordinator (DP-FedAvg: each update clipped to
// clip_norm, Gaussian noise of noise_multiplier × clip_norm on their sum) and the federation's
// budget (max_epsilon at delta), which fedl serve never lets a round exceed. 0: off / none.
struct PrivacyConfig
{
  double clip_norm = 0;
  double noise_multiplier = 0;
  double max_epsilon = 0;
  double delta = 1e-5;
  Accountant accountant = Accountant::pld_v1; // fedl.json "accountant": "pld" or "rdp"

  bool operator==(const PrivacyConfig&) const = default;
};

// The server optimizer's settings as JSON: {"lr", "momentum", "beta1", "beta2", "tau"}, in fedl.json,
// the serve entry and each round entry's "options". Reading also takes the names that round
// entries used until December 2026 ("server_lr", "server_momentum"), so that older ledgers read
// the same; a missing key keeps its default. UsageError naming `what` and the key (under `path`)
// for a wrong type, both names of one setting, or a key that is neither these nor `also_allowed`.
nlohmann::json to_json(const ServerOptimizer& o);
ServerOptimizer server_optimizer_from_json(const nlohmann::json& j, const std::string& path, const std::string& what,
                                           const std::vector<std::string>& also_allowed = {});

// fedl.json's "limits": what the coordinator accepts of one update, against sites that send
// finite but huge values or claim a huge sample count to outweigh the others in fedavg.
// max_update_norm bounds the update's L2 norm (over all tensors; honest updates are orders of
// magnitude smaller); max_num_samples bounds fedl.num_samples (fedl init --partition sets it to
// the largest shard). An update past either is rejected with the reason recorded.
struct LimitsConfig
{
  static constexpr double default_max_update_norm = 1e5;
  static constexpr std::uint64_t default_max_num_samples = 10'000'000;

  double max_update_norm = default_max_update_norm;
  std::uint64_t max_num_samples = default_max_num_samples;

  bool operator==(const LimitsConfig&) const = default;
};
// Throws UsageError unless both limits are positive (and the norm finite); `norm` and `samples`
// name them as the caller's user set them.
void check_limits(const LimitsConfig& limits, const char* norm = "max_update_norm",
                  const char* samples = "max_num_samples");

// fedl.json's "secure_aggregation" (present: on): SecAgg+ with a threshold t (0: a majority of a
// site's neighbours, at least 2; a value in (0, 1): that fraction of the sites asked, rounded up;
// else a count), k neighbours per site (0: everyone up to 16 sites, then 2⌈log2 n⌉ + 2; an odd k
// below n − 1 is taken up to the next even number), the encoding's range R (each value of an
// update is clipped to [−R, R] before it is encoded), and distributed DP (with client-level DP:
// each site adds its share of the noise before masking, so nobody holds an un-noised sum).
struct SecureAggregationConfig
{
  // The most sites one secure round asks (their signatures ride in one frame header) and the most
  // neighbours one site has (their certificates ride in another).
  static constexpr std::size_t max_sites = 400;
  static constexpr std::uint32_t max_neighbours = 40;

  double threshold = 0;
  std::uint32_t neighbours = 0;
  double range = 1;
  bool distributed_dp = false;

  bool operator==(const SecureAggregationConfig&) const = default;
};
// Throws UsageError naming `names`' fields unless the threshold is 0, a fraction in (0, 1) or a
// whole count ≥ 2, the neighbours 0 or 2 to max_neighbours, and the range positive and finite.
struct SecureAggregationNames
{
  const char* threshold = "threshold";
  const char* neighbours = "neighbours";
  const char* range = "range";
};
void check_secure_aggregation(const SecureAggregationConfig& s, const SecureAggregationNames& names = {});
nlohmann::json to_json(const SecureAggregationConfig& s);

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
  ServerOptimizer server_optimizer;
  TrainingConfig training;
  PrivacyConfig privacy;
  LimitsConfig limits;
  std::optional<SecureAggregationConfig> secure_aggregation;
  // How the federation's data is laid out (fedl init --partition records it); none in workspaces
  // made without data, or by an older fedl.
  std::optional<DataContract> data;
  std::uint64_t seed = 0;
  std::uint32_t valid_days = 365;
};

// A site name must be usable as a folder name and a certificate CN: 1-64 characters of
// [A-Za-z0-9._-], not starting with '.' or '-'. Throws UsageError naming it.
void check_site_name(const std::string& name);

nlohmann::json to_json(const FederationConfig& config);
nlohmann::json to_json(const TrainingConfig& training);
nlohmann::json to_json(const PrivacyConfig& privacy);
// Throws UsageError naming the first value out of the range fedl train's options accept.
void check_training(const TrainingConfig& training);
// A "training" object (fedl.json's, or a training task's), read strictly: unknown keys and wrong
// types are a UsageError naming `what` and the field (a setting silently ignored would train
// differently from what was asked), then check_training.
TrainingConfig training_from_json(const nlohmann::json& training, const std::string& what);
// Throws UsageError unless noise multiplier and clip norm are positive and finite and delta is
// in (0, 1); `flags` names them in the message as the caller's user knows them, e.g.
// {"--dp-noise-multiplier", "--dp-max-grad-norm", "--dp-delta"}.
struct DpFlagNames
{
  const char* noise_multiplier;
  const char* clip;
  const char* delta;
};
void check_dp(double noise_multiplier, double clip, double delta, const DpFlagNames& names);
// The same for fedl.json's "privacy": every field 0 is "off"; clip_norm and noise_multiplier
// come together (check_dp); max_epsilon is positive if set, and needs them (it budgets
// client-level DP). `names` name the fields as the caller's user set them: fedl.json's keys by
// default, or the flags of fedl init or fedl serve.
struct PrivacyNames
{
  const char* clip_norm = "clip_norm";
  const char* noise_multiplier = "noise_multiplier";
  const char* max_epsilon = "max_epsilon";
  const char* delta = "delta";
};
void check_privacy(const PrivacyConfig& privacy, const PrivacyNames& names = {});
// Throws UsageError (exit 2) naming `what` (the file) and the field path for unknown keys,
// missing required fields and wrong types.
FederationConfig config_from_json(const nlohmann::json& j, const std::string& what);

FederationConfig load_config(const std::filesystem::path& path);
// The canonical text written to fedl.json (2-space indented, keys sorted, final newline).
std::string config_text(const FederationConfig& config);

} // namespace fedl::core
