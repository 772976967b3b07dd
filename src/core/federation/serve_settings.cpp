// SPDX-License-Identifier: Apache-2.0
#include "core/federation/serve_settings.hpp"

#include "core/util/error.hpp"

#include <cmath>

namespace fedl::core {

std::optional<std::string>
ServeSettings::sandbox_refusal(std::optional<SandboxLevel> level) const
{
  if (!require_sandbox || (level && static_cast<int>(*level) >= static_cast<int>(*require_sandbox))) {
    return std::nullopt;
  }
  return fmt::format("its trainer ran {}, and this coordinator requires --sandbox {} (serve --require-sandbox)",
                     level ? "with --sandbox " + sandbox_level_name(*level) : std::string("with no sandbox it reports"),
                     sandbox_level_name(*require_sandbox));
}

nlohmann::json
ServeSettings::to_json() const
{
  nlohmann::json j = {{"listen", listen.to_string()},
                      {"rounds", rounds},
                      {"min_clients", min_clients},
                      {"clients_per_round", clients_per_round},
                      {"fraction", fraction},
                      {"round_timeout", round_timeout},
                      {"wait_timeout", wait_timeout},
                      {"strategy", strategy.to_string()},
                      {"server_optimizer", core::to_json(server.optimizer)},
                      {"training", core::to_json(training)},
                      {"seed", seed},
                      {"selection", seeded_selection ? "seeded" : "secret"},
                      {"heartbeat", heartbeat},
                      {"max_site_failures", max_site_failures}};
  if (server.clip_norm) {
    j["clip_norm"] = *server.clip_norm;
  }
  if (privacy != PrivacyConfig{}) {
    j["privacy"] = core::to_json(privacy);
  }
  if (secure_aggregation) {
    j["secure_aggregation"] = core::to_json(*secure_aggregation);
  }
  if (eval_data) {
    j["eval_data"] = eval_data->string();
  }
  if (best_metric) {
    j["best_metric"] = best_metric->name;
  }
  if (require_sandbox) {
    j["require_sandbox"] = sandbox_level_name(*require_sandbox);
  }
  if (target_accuracy) {
    j["target_accuracy"] = *target_accuracy;
  }
  if (metrics) {
    j["metrics"] = metrics->to_string();
  }
  return j;
}

void
check_secure_fits(const SecureAggregationConfig& s, const StrategySpec& strategy, const PrivacyConfig& privacy,
                  std::string_view client_dp_flags)
{
  if (!strategy.mean_type()) {
    throw UsageError("secure aggregation shows the coordinator only the sum of each round's updates, and {} needs "
                     "every update on its own; use a mean-type strategy (fedavg, fedavgm, fedadam, fedyogi, "
                     "fedadagrad)",
                     strategy.to_string());
  }
  if (s.distributed_dp && privacy.noise_multiplier <= 0) {
    throw UsageError("distributed DP has each site add its share of client-level DP's noise: it needs {}",
                     client_dp_flags);
  }
}

void
ServeSettings::check_secure_aggregation(std::size_t enrolled) const
{
  if (!secure_aggregation) {
    return;
  }
  check_secure_fits(*secure_aggregation, strategy, privacy,
                    "--dp-clip-norm and --dp-noise-multiplier (or fedl.json privacy)");
  if (server.clip_norm) {
    throw UsageError("--clip-norm clips each update at the coordinator, which never sees one under secure "
                     "aggregation; client-level DP's clip (--dp-clip-norm) is applied by each site itself");
  }
  if (min_clients < 3) {
    throw UsageError("secure aggregation needs at least 3 sites in a round (the sum of 2 would tell each its "
                     "partner's update): --min-clients 3 or more");
  }
  const auto most = clients_per_round > 0 ? std::size_t{clients_per_round}
                    : fraction > 0 ? static_cast<std::size_t>(std::ceil(fraction * static_cast<double>(enrolled)))
                                   : enrolled;
  if (most > SecureAggregationConfig::max_sites) {
    throw UsageError("a secure round asks at most {} sites, and these settings would ask {} of the {} enrolled: "
                     "give --clients-per-round {} or fewer",
                     SecureAggregationConfig::max_sites, most, enrolled, SecureAggregationConfig::max_sites);
  }
}

} // namespace fedl::core
