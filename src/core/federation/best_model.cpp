// SPDX-License-Identifier: Apache-2.0
#include "core/federation/best_model.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

constexpr std::array<std::pair<const char*, bool>, 5> metrics = {
  {{"accuracy", true}, {"loss", false}, {"macro_f1", true}, {"weighted_f1", true}, {"roc_auc", true}}};

} // namespace

std::optional<BestMetric>
parse_best_metric(std::string_view name)
{
  for (const auto& [n, higher] : metrics) {
    if (name == n) {
      return BestMetric{n, higher};
    }
  }
  return std::nullopt;
}

const char*
best_metric_names() noexcept
{
  return "accuracy, loss, macro_f1, weighted_f1, roc_auc";
}

std::optional<BestModel>
BestModel::from_json(const nlohmann::json& j)
{
  if (!j.is_object() || !j.contains("round") || !j["round"].is_number_unsigned() || !j.contains("metric") ||
      !j["metric"].is_string() || !parse_best_metric(j["metric"].get<std::string>()) || !j.contains("value") ||
      !j["value"].is_number()) {
    return std::nullopt;
  }
  return BestModel{j["round"].get<std::uint64_t>(), j["metric"].get<std::string>(), j["value"].get<double>()};
}

std::optional<BestModel>
next_best(const std::optional<BestModel>& prior, const BestMetric& metric, std::uint64_t round,
          const nlohmann::json& evaluation)
{
  const auto same = prior && prior->metric == metric.name ? prior : std::nullopt;
  const auto it = evaluation.is_object() ? evaluation.find(metric.name) : evaluation.end();
  if (!evaluation.is_object() || it == evaluation.end() || !it->is_number() || !std::isfinite(it->get<double>())) {
    return same;
  }
  const double v = it->get<double>();
  if (!same || (metric.higher_is_better ? v > same->value : v < same->value)) {
    return BestModel{round, metric.name, v};
  }
  return same;
}

void
link_best_model(const Workspace& ws, std::uint64_t round)
{
  const auto target = ws.best_model();
  const auto source = ws.model(round);
  const auto tmp = target.parent_path() / fmt::format(".best.safetensors.tmp-{:08x}", std::random_device{}());
  if (::link(source.c_str(), tmp.c_str()) != 0) {
    // No hard links here (or across file systems): a copy, written whole.
    const MappedFile file(source);
    const std::array<std::span<const std::byte>, 1> parts{file.bytes()};
    atomic_write(target, parts);
    return;
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error("cannot write {}: {}", target.string(), std::strerror(err));
  }
  sync_folder(target.parent_path());
}

void
relink_best_model(const Workspace& ws, std::uint64_t round)
{
  struct stat best
  {
  }, model{};
  if (::stat(ws.best_model().c_str(), &best) != 0 || ::stat(ws.model(round).c_str(), &model) != 0 ||
      best.st_ino != model.st_ino || best.st_size != model.st_size) {
    link_best_model(ws, round);
  }
}

} // namespace fedl::core
