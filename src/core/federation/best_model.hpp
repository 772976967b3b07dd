// SPDX-License-Identifier: Apache-2.0
// The best model so far, by a metric of the coordinator's evaluation (fedl serve --best-metric):
// every round entry after the first evaluated one records it as "best": {round, metric, value};
// models/best.safetensors is a hard link to that round's model, made after the entry is written
// (and again when a coordinator resumes, so a crash between the two leaves nothing stale).
// fedl audit checks each recorded best against the evaluations and the file against the ledger.
#pragma once

#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace fedl::core {

struct BestMetric
{
  std::string name; // a field of a round's "evaluation": accuracy, loss, macro_f1, weighted_f1, roc_auc
  bool higher_is_better = true;
};
// The metric of `name`; nullopt for a name that is not one.
std::optional<BestMetric> parse_best_metric(std::string_view name);
// The names parse_best_metric knows, for messages and completions.
const char* best_metric_names() noexcept;

struct BestModel
{
  std::uint64_t round = 0;
  std::string metric;
  double value = 0;

  nlohmann::json to_json() const { return {{"round", round}, {"metric", metric}, {"value", value}}; }
  // nullopt unless `j` is {round, metric, value} of a known metric.
  static std::optional<BestModel> from_json(const nlohmann::json& j);
};

// The best after round `round` evaluated as `evaluation`: that round, if its `metric` value beats
// `prior` (a prior by another metric does not count), else `prior`; nullopt if neither exists.
std::optional<BestModel> next_best(const std::optional<BestModel>& prior, const BestMetric& metric, std::uint64_t round,
                                   const nlohmann::json& evaluation);

// Points models/best.safetensors at round `round`'s model: a hard link made beside it and
// renamed into place (a copy where the file system has no hard links). Throws Error naming the
// file.
void link_best_model(const Workspace& ws, std::uint64_t round);
// The same unless models/best.safetensors already is that model (the same file, or a copy of its
// size where the file system has no hard links).
void relink_best_model(const Workspace& ws, std::uint64_t round);

} // namespace fedl::core
