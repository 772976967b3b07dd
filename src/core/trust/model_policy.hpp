// SPDX-License-Identifier: Apache-2.0
// What a site accepts of a TorchScript module (fedl-join(1) --model-policy): strict (fedl's own
// architectures only), inspect (a module that passes the operator allow-list) or pinned (only the
// module of one SHA-256, inspected too). The site tells the coordinator with each update; the
// ledger records it.
#pragma once

#include <array>
#include <optional>
#include <string_view>

namespace fedl::core {

enum class ModelPolicy
{
  strict,
  inspect,
  pinned,
};

inline constexpr std::array<ModelPolicy, 3> model_policies{ModelPolicy::strict, ModelPolicy::inspect,
                                                           ModelPolicy::pinned};

constexpr std::string_view
model_policy_name(ModelPolicy p) noexcept
{
  switch (p) {
  case ModelPolicy::strict:
    return "strict";
  case ModelPolicy::pinned:
    return "pinned";
  default:
    return "inspect";
  }
}

// The policy named `text`, if it names one.
constexpr std::optional<ModelPolicy>
model_policy_named(std::string_view text) noexcept
{
  for (const auto p : model_policies) {
    if (text == model_policy_name(p)) {
      return p;
    }
  }
  return std::nullopt;
}

} // namespace fedl::core
