// SPDX-License-Identifier: Apache-2.0
#include "core/federation/serve_settings.hpp"

namespace fedl::core {

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
                      {"heartbeat", heartbeat}};
  if (server.clip_norm) {
    j["clip_norm"] = *server.clip_norm;
  }
  if (privacy != PrivacyConfig{}) {
    j["privacy"] = core::to_json(privacy);
  }
  if (eval_data) {
    j["eval_data"] = eval_data->string();
  }
  if (target_accuracy) {
    j["target_accuracy"] = *target_accuracy;
  }
  if (metrics) {
    j["metrics"] = metrics->to_string();
  }
  return j;
}

} // namespace fedl::core
