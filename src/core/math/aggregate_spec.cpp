// SPDX-License-Identifier: Apache-2.0
// Strategy specs: the names and parameters of the aggregation strategies (parse_strategy and
// StrategySpec), and the checks of the server's options.
#include "core/math/aggregate.hpp"

#include "core/math/aggregate_detail.hpp"
#include "core/util/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <optional>
#include <system_error>

namespace fedl::core {

namespace {

using namespace aggregate_detail;

constexpr std::string_view k_forms =
  "fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean:BETA (0 <= BETA < 0.5), "
  "krum:F, multi-krum:F,M (F >= 0 updates tolerated as faulty, M >= 1 updates averaged)";

struct NamedStrategy
{
  Strategy kind;
  std::string_view name;
};

constexpr std::array<NamedStrategy, 9> k_strategies{{
  {Strategy::fedavg, "fedavg"},
  {Strategy::fedavgm, "fedavgm"},
  {Strategy::fedadam, "fedadam"},
  {Strategy::fedyogi, "fedyogi"},
  {Strategy::fedadagrad, "fedadagrad"},
  {Strategy::median, "median"},
  {Strategy::trimmed_mean, "trimmed-mean"},
  {Strategy::krum, "krum"},
  {Strategy::multi_krum, "multi-krum"},
}};

std::optional<double>
parse_double(std::string_view text)
{
  double value = 0;
  const auto* end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || p != end || !std::isfinite(value)) {
    return std::nullopt;
  }
  return value;
}

} // namespace

std::string_view
StrategySpec::name() const noexcept
{
  for (const auto& s : k_strategies) {
    if (s.kind == kind) {
      return s.name;
    }
  }
  return "fedavg";
}

std::string
StrategySpec::to_string() const
{
  switch (kind) {
  case Strategy::trimmed_mean:
    return fmt::format("trimmed-mean:{}", trim);
  case Strategy::krum:
    return fmt::format("krum:{}", byzantine);
  case Strategy::multi_krum:
    return fmt::format("multi-krum:{},{}", byzantine, select);
  default:
    return std::string(name());
  }
}

bool
StrategySpec::stateful() const noexcept
{
  return kind == Strategy::fedavgm || adaptive(kind);
}

bool
StrategySpec::weighted() const noexcept
{
  return mean_type() || kind == Strategy::multi_krum;
}

bool
StrategySpec::mean_type() const noexcept
{
  return kind == Strategy::fedavg || stateful();
}

StrategySpec
parse_strategy(const std::string& spec)
{
  const auto fail = [&](std::string_view why) {
    return UsageError("invalid strategy '{}': {}; valid forms: {}", spec, why, k_forms);
  };
  const auto colon = spec.find(':');
  const std::string_view text(spec);
  const auto head = text.substr(0, colon);
  const std::optional<std::string_view> arg =
    colon == std::string::npos ? std::nullopt : std::optional<std::string_view>(text.substr(colon + 1));
  const auto it = std::find_if(k_strategies.begin(), k_strategies.end(), [&](const auto& s) { return s.name == head; });
  if (it == k_strategies.end()) {
    throw fail(head.empty() ? "no strategy name" : "unknown strategy name");
  }
  StrategySpec out;
  out.kind = it->kind;
  switch (out.kind) {
  case Strategy::trimmed_mean: {
    if (!arg) {
      throw fail("trimmed-mean needs BETA, the fraction trimmed at each end (e.g. trimmed-mean:0.1)");
    }
    const auto beta = parse_double(*arg);
    if (!beta || *beta < 0.0 || *beta >= 0.5) {
      throw fail("BETA must be a number with 0 <= BETA < 0.5");
    }
    out.trim = *beta;
    break;
  }
  case Strategy::krum: {
    const auto f = arg ? parse_unsigned<std::size_t>(*arg) : std::nullopt;
    if (!f) {
      throw fail("krum needs F, the number of faulty updates tolerated, a non-negative integer (e.g. krum:1)");
    }
    out.byzantine = *f;
    break;
  }
  case Strategy::multi_krum: {
    const auto comma = arg ? arg->find(',') : std::string_view::npos;
    const auto f = comma != std::string_view::npos ? parse_unsigned<std::size_t>(arg->substr(0, comma)) : std::nullopt;
    const auto m = comma != std::string_view::npos ? parse_unsigned<std::size_t>(arg->substr(comma + 1)) : std::nullopt;
    if (!f || !m || *m == 0) {
      throw fail("multi-krum needs F,M: non-negative integer F and positive integer M (e.g. multi-krum:1,3)");
    }
    out.byzantine = *f;
    out.select = *m;
    break;
  }
  default:
    if (arg) {
      throw fail(fmt::format("{} takes no parameter", head));
    }
    break;
  }
  return out;
}

void
validate_server_options(const ServerOptions& o)
{
  const auto unit = [](double x) { return std::isfinite(x) && x >= 0.0 && x < 1.0; };
  const auto& s = o.optimizer;
  if (!std::isfinite(s.lr) || s.lr <= 0.0) {
    throw UsageError("--server-lr must be a positive number, not {}", s.lr);
  }
  if (!unit(s.momentum)) {
    throw UsageError("--server-momentum must be in [0, 1), not {}", s.momentum);
  }
  if (!unit(s.beta1)) {
    throw UsageError("--beta1 must be in [0, 1), not {}", s.beta1);
  }
  if (!unit(s.beta2)) {
    throw UsageError("--beta2 must be in [0, 1), not {}", s.beta2);
  }
  if (!std::isfinite(s.tau) || s.tau <= 0.0) {
    throw UsageError("--tau must be a positive number, not {}", s.tau);
  }
  if (o.clip_norm && (!std::isfinite(*o.clip_norm) || *o.clip_norm <= 0.0)) {
    throw UsageError("--clip-norm must be a positive number, not {}", *o.clip_norm);
  }
  if (o.client_dp) {
    if (!o.clip_norm) {
      throw UsageError("client-level DP needs a clip norm (--dp-clip-norm)");
    }
    if (!(o.client_dp->noise_std > 0) || !std::isfinite(o.client_dp->noise_std)) {
      throw UsageError("client-level DP: the noise standard deviation must be a positive number, not {}",
                       o.client_dp->noise_std);
    }
    if (!(o.client_dp->denominator >= 1) || !std::isfinite(o.client_dp->denominator)) {
      throw UsageError("client-level DP: the denominator must be at least 1, not {}", o.client_dp->denominator);
    }
  }
}

} // namespace fedl::core
