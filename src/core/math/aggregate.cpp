// SPDX-License-Identifier: Apache-2.0
// Aggregation: aggregate() over updates in memory or in mapped files (the checks, the server
// state, the output, and the robust, krum and mean strategies over the passes), and the server
// state files. Strategy specs are in aggregate_spec.cpp, update validation in
// aggregate_validate.cpp.
#include "core/math/aggregate.hpp"

#include "core/math/aggregate_detail.hpp"
#include "core/util/error.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <system_error>
#include <thread>
#include <utility>

#include <type_traits>

namespace fedl::core {

namespace {

using namespace aggregate_detail;

// The largest page-cache folio that a read fault maps at once (a PMD on x86-64).
constexpr std::size_t k_folio_bytes = std::size_t{2} << 20;
// Updates are read in place while their expected resident pages stay below 2 × model + this.
constexpr std::size_t k_mapped_slack = std::size_t{32} << 20;

// A zero-filled buffer of `size` bytes. A large one is backed by transparent huge pages where the
// kernel offers them (MADV_HUGEPAGE before the first touch): faulting the new model in by 2 MiB
// instead of 4 KiB pages makes allocating it about three times faster (measured: 256 MB in 58
// instead of 170 ms).
std::vector<std::byte>
zeroed_buffer(std::size_t size)
{
  std::vector<std::byte> v;
  v.reserve(size);
  constexpr std::uintptr_t huge = std::uintptr_t{2} << 20;
  if (size >= 2 * huge) {
    const auto a = reinterpret_cast<std::uintptr_t>(v.data());
    const auto lo = (a + huge - 1) / huge * huge;
    const auto hi = (a + size) / huge * huge;
    if (hi > lo) {
      // Only a hint: without it the pages are simply 4 KiB ones.
      ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
    }
  }
  v.resize(size);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Server state.

std::vector<OwnedTensor>
filled_like(const Safetensors& base, double value)
{
  std::vector<OwnedTensor> out;
  out.reserve(base.tensors.size());
  for (const auto& t : base.tensors) {
    OwnedTensor o{t.name, t.dtype, t.shape, zeroed_buffer(t.data.size())};
    const std::size_t es = dtype_size(t.dtype);
    if (value != 0.0) {
      for (std::size_t j = 0; j < t.numel(); ++j) {
        if (t.dtype == DType::f32) {
          store<float>(o.bytes.data() + j * es, static_cast<float>(value));
        } else {
          store<double>(o.bytes.data() + j * es, value);
        }
      }
    }
    out.push_back(std::move(o));
  }
  return out;
}

// Throws VerifyError unless `tensors` are exactly one per parameter, in the same order, with the
// same names, dtypes and shapes.
void
check_state_tensors(const std::vector<OwnedTensor>& tensors, std::string_view which, const Safetensors& base)
{
  if (tensors.size() != base.tensors.size()) {
    throw VerifyError("the server state has {} {} tensors but the model has {} parameters: it belongs to another "
                      "model",
                      tensors.size(), which, base.tensors.size());
  }
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const auto& s = tensors[k];
    const auto& p = base.tensors[k];
    if (s.name != p.name || s.dtype != p.dtype || s.shape != p.shape || s.bytes.size() != p.data.size()) {
      throw VerifyError("the server state's {} tensor {} ({} {}) does not match the model's parameter {} ({} {})",
                        which, s.name, dtype_name(s.dtype), shape_text(s.shape), p.name, dtype_name(p.dtype),
                        shape_text(p.shape));
    }
  }
}

} // namespace

namespace aggregate_detail {

std::string
shape_text(const std::vector<std::int64_t>& shape)
{
  return fmt::format("[{}]", fmt::join(shape, ","));
}

} // namespace aggregate_detail

// -------------------------------------------------------------------------------------------------
// Server state files.

void
save_server_state(const std::filesystem::path& path, const ServerState& state)
{
  std::vector<std::string> names;
  names.reserve(state.m.size() + state.v.size());
  for (const auto& t : state.m) {
    names.push_back("m." + t.name);
  }
  for (const auto& t : state.v) {
    names.push_back("v." + t.name);
  }
  std::vector<TensorView> views;
  views.reserve(names.size());
  std::size_t k = 0;
  for (const auto* set : {&state.m, &state.v}) {
    for (const auto& t : *set) {
      views.push_back({names[k++], t.dtype, t.shape, t.bytes});
    }
  }
  const Metadata meta{
    {"fedl.kind", "server-state"}, {"fedl.strategy", state.strategy}, {"fedl.round", std::to_string(state.round)}};
  write_safetensors(path, views, meta);
}

ServerState
load_server_state(const std::filesystem::path& path, const StrategySpec& spec, std::span<const TensorView> params)
{
  if (!spec.stateful()) {
    throw UsageError("strategy {} keeps no server state", spec.name());
  }
  const SafetensorsFile file(path);
  const auto& c = file.content();
  const auto where = path.string();
  const auto kind = c.meta("fedl.kind");
  if (kind != "server-state") {
    throw VerifyError("{}: not a fedl server state file (fedl.kind is '{}', not 'server-state')", where,
                      kind.value_or(""));
  }
  const auto strategy = c.meta("fedl.strategy").value_or("");
  if (strategy != spec.name()) {
    throw VerifyError("{}: server state saved by strategy '{}', but this round uses {}: use the matching "
                      "strategy or start without state",
                      where, strategy, spec.name());
  }
  const auto round_text = c.meta("fedl.round").value_or("");
  const auto round = parse_unsigned<std::uint64_t>(round_text);
  if (!round) {
    throw VerifyError("{}: fedl.round is '{}', not a round number", where, round_text);
  }
  ServerState state;
  state.strategy = strategy;
  state.round = *round;
  const bool with_v = adaptive(spec.kind);
  for (const auto& p : params) {
    for (const char prefix : {'m', 'v'}) {
      if (prefix == 'v' && !with_v) {
        continue;
      }
      const auto name = fmt::format("{}.{}", prefix, p.name);
      const auto* t = c.find(name);
      if (t == nullptr) {
        throw VerifyError("{}: no tensor {} for parameter {}: the state belongs to another model", where, name, p.name);
      }
      if (t->dtype != p.dtype || t->shape != p.shape) {
        throw VerifyError("{}: tensor {} is {} {}, but parameter {} is {} {}: the state belongs to another model",
                          where, name, dtype_name(t->dtype), shape_text(t->shape), p.name, dtype_name(p.dtype),
                          shape_text(p.shape));
      }
      OwnedTensor o{p.name, t->dtype, t->shape, {t->data.begin(), t->data.end()}};
      (prefix == 'm' ? state.m : state.v).push_back(std::move(o));
    }
  }
  const std::size_t expected = params.size() * (with_v ? 2 : 1);
  if (c.tensors.size() != expected) {
    for (const auto& t : c.tensors) {
      const bool known = std::any_of(params.begin(), params.end(), [&](const TensorView& p) {
        return t.name == "m." + p.name || (with_v && t.name == "v." + p.name);
      });
      if (!known) {
        throw VerifyError("{}: tensor {} matches no parameter of the model: the state belongs to another model", where,
                          t.name);
      }
    }
  }
  return state;
}

// -------------------------------------------------------------------------------------------------
// Aggregation.

namespace {

// Throws unless the updates, their weights, the strategy and the server options fit together.
void
check_inputs(std::size_t n, std::span<const double> weights, const StrategySpec& spec, const ServerOptions& options)
{
  validate_server_options(options);
  if (n == 0) {
    throw Error("no updates to aggregate");
  }
  if (weights.size() != n) {
    throw Error("{} weights for {} updates", weights.size(), n);
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(weights[i]) || weights[i] <= 0.0) {
      throw Error("update {}: weight {} is not a positive number", i + 1, weights[i]);
    }
  }
  const bool krum = spec.kind == Strategy::krum || spec.kind == Strategy::multi_krum;
  if (krum && n < spec.byzantine + 3) {
    throw Error("{} needs at least F + 3 = {} updates (each is scored by its N - F - 2 nearest neighbours); got {}",
                spec.to_string(), spec.byzantine + 3, n);
  }
  if (spec.kind == Strategy::multi_krum && spec.select > n - spec.byzantine) {
    throw Error("{} averages M = {} updates, but at most N - F = {} of the {} updates can be trusted", spec.to_string(),
                spec.select, n - spec.byzantine, n);
  }
  if (spec.kind == Strategy::trimmed_mean && !(spec.trim >= 0.0 && spec.trim < 0.5)) {
    throw UsageError("trimmed-mean: BETA must satisfy 0 <= BETA < 0.5, not {}", spec.trim);
  }
  if (options.client_dp && !spec.mean_type()) {
    throw UsageError("client-level DP adds noise to a mean, so it needs a mean-type strategy (fedavg, fedavgm, "
                     "fedadam, fedyogi, fedadagrad), not {}",
                     spec.to_string());
  }
}

// The server state of a stateful strategy, with the plan pointing at its m and v: `state`
// validated if carried over, or `fresh` created if this is the first round; null for a stateless
// strategy. Nothing is modified before the passes, which cannot fail.
ServerState*
prepare_state(const Safetensors& base, const StrategySpec& spec, const ServerOptions& options, ServerState& state,
              ServerState& fresh, Plan& plan)
{
  if (!spec.stateful()) {
    return nullptr;
  }
  ServerState* st = nullptr;
  if (state.empty()) {
    fresh.strategy = std::string(spec.name());
    fresh.m = filled_like(base, 0.0);
    if (adaptive(spec.kind)) {
      fresh.v = filled_like(base, options.optimizer.tau * options.optimizer.tau);
    }
    st = &fresh;
  } else {
    if (state.strategy != spec.name()) {
      throw VerifyError("the server state belongs to strategy '{}', but this round uses {}", state.strategy,
                        spec.name());
    }
    check_state_tensors(state.m, "m", base);
    if (adaptive(spec.kind)) {
      check_state_tensors(state.v, "v", base);
    } else if (!state.v.empty()) {
      throw VerifyError("the server state of {} has v tensors, which {} does not use", state.strategy, spec.name());
    }
    st = &state;
  }
  for (std::size_t k = 0; k < plan.tensors.size(); ++k) {
    plan.tensors[k].m = st->m[k].bytes.data();
    if (adaptive(spec.kind)) {
      plan.tensors[k].v = st->v[k].bytes.data();
    }
  }
  return st;
}

// The new model's tensors, zero-filled, with the plan's outputs pointing into them.
std::vector<OwnedTensor>
output_tensors(const Safetensors& base, Plan& plan)
{
  std::vector<OwnedTensor> out;
  out.reserve(base.tensors.size());
  for (std::size_t k = 0; k < base.tensors.size(); ++k) {
    const auto& t = base.tensors[k];
    out.push_back({t.name, t.dtype, t.shape, zeroed_buffer(t.data.size())});
    plan.tensors[k].out = out.back().bytes.data();
  }
  return out;
}

// For mapped files: small pages for what is read in place, and the window of pages released.
void
prepare_access(const Safetensors& base, std::span<const Safetensors> updates, unsigned threads, Access& access)
{
  if (!access.mapped) {
    return;
  }
  const std::size_t n = updates.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (access.fds[i] < 0) {
      for (const auto& t : updates[i].tensors) {
        PageReleaser::small_pages(t.data.data(), t.data.size());
      }
    }
  }
  for (const auto& t : base.tensors) {
    PageReleaser::small_pages(t.data.data(), t.data.size());
  }
  access.window = release_window(n + 1, threads);
}

// The factor that scales each of the n updates to at most the clip norm (1 without one); the
// norms and which updates were clipped go to `local`.
std::vector<double>
clip_scales(const Pass& pass, std::size_t n, const ServerOptions& options, AggregateInfo& local)
{
  std::vector<double> scale(n, 1.0);
  if (options.clip_norm) {
    local.norms = norms_pass(pass);
    local.clipped.assign(n, false);
    for (std::size_t i = 0; i < n; ++i) {
      if (local.norms[i] > *options.clip_norm) {
        scale[i] = *options.clip_norm / local.norms[i];
        local.clipped[i] = true;
      }
    }
  }
  return scale;
}

// Coordinate-wise median or trimmed mean.
void
robust_step(const Pass& pass, const StrategySpec& spec, std::span<const double> scale, const Step& step)
{
  const std::size_t n = scale.size();
  std::size_t lo = 0;
  std::size_t hi = n;
  if (spec.kind == Strategy::median) {
    lo = (n - 1) / 2;
    hi = n / 2 + 1;
  } else {
    // floor(BETA·N), with a little slack so that 0.29·100 drops 29 although 0.29·100 < 29 in
    // binary floating point; never so many that nothing is left.
    auto drop = static_cast<std::size_t>(std::floor(spec.trim * static_cast<double>(n) + 1e-9));
    drop = std::min(drop, (n - 1) / 2);
    lo = drop;
    hi = n - drop;
  }
  robust_pass(pass, scale, lo, hi, step);
}

// Krum and multi-krum: the (weighted) mean of the updates with the lowest scores, the scores and
// the selection going to `local`.
void
krum_step(const Pass& pass, const StrategySpec& spec, std::span<const double> weights, std::span<const double> scale,
          const Step& step, AggregateInfo& local)
{
  const std::size_t n = scale.size();
  const auto dist = distance_pass(pass, scale);
  const std::size_t neighbours = n - spec.byzantine - 2;
  local.krum_scores.assign(n, 0.0);
  std::vector<double> row;
  for (std::size_t i = 0; i < n; ++i) {
    row.clear();
    for (std::size_t j = 0; j < n; ++j) {
      if (j != i) {
        row.push_back(dist[i * n + j]);
      }
    }
    std::partial_sort(row.begin(), row.begin() + static_cast<std::ptrdiff_t>(neighbours), row.end());
    local.krum_scores[i] = std::accumulate(row.begin(), row.begin() + static_cast<std::ptrdiff_t>(neighbours), 0.0);
  }
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return local.krum_scores[a] < local.krum_scores[b]; });
  const std::size_t m = spec.kind == Strategy::krum ? 1 : spec.select;
  local.selected.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(m));
  std::vector<double> coef(m);
  double denominator = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const auto i = local.selected[k];
    const double w = spec.kind == Strategy::krum ? 1.0 : weights[i];
    coef[k] = w * scale[i];
    denominator += w;
  }
  mean_pass(pass, local.selected, coef, denominator, step);
}

// The mean-type strategies: the weighted mean of all updates, or with client-level DP their sum
// over the fixed denominator, with noise.
void
mean_step(const Pass& pass, std::span<const double> weights, std::span<const double> scale,
          const ServerOptions& options, Step step)
{
  const std::size_t n = scale.size();
  std::vector<std::size_t> all(n);
  std::iota(all.begin(), all.end(), std::size_t{0});
  std::vector<double> coef(n);
  double denominator = 0;
  for (std::size_t i = 0; i < n; ++i) {
    coef[i] = weights[i] * scale[i];
    denominator += weights[i];
  }
  if (options.client_dp) {
    for (std::size_t i = 0; i < n; ++i) {
      coef[i] = scale[i];
    }
    denominator = options.client_dp->denominator;
    step.noise_std = options.client_dp->noise_std;
    step.noise_seed = options.client_dp->seed;
  }
  mean_pass(pass, all, coef, denominator, step);
}

std::vector<OwnedTensor>
aggregate_impl(const Safetensors& base, std::span<const Safetensors> updates, std::span<const double> weights,
               const StrategySpec& spec, const ServerOptions& options, ServerState& state, AggregateInfo* info,
               Access& access)
{
  check_inputs(updates.size(), weights, spec, options);
  const std::size_t n = updates.size();

  Plan plan = make_plan(base, updates);
  ServerState fresh;
  ServerState* st = prepare_state(base, spec, options, state, fresh, plan);
  std::vector<OwnedTensor> out = output_tensors(base, plan);

  const unsigned threads = thread_count(options, plan.total);
  prepare_access(base, updates, threads, access);
  AggregateInfo local;
  local.values.resize(n);
  const Pass pass{plan, threads, access, local.values};
  const auto& opt = options.optimizer;
  const Step step{spec.kind, opt.lr, opt.momentum, opt.beta1, opt.beta2, opt.tau};

  const std::vector<double> scale = clip_scales(pass, n, options, local);
  switch (spec.kind) {
  case Strategy::median:
  case Strategy::trimmed_mean:
    robust_step(pass, spec, scale, step);
    break;
  case Strategy::krum:
  case Strategy::multi_krum:
    krum_step(pass, spec, weights, scale, step, local);
    break;
  default:
    mean_step(pass, weights, scale, options, step);
    break;
  }

  if (st != nullptr) {
    st->round += 1;
    if (st == &fresh) {
      state = std::move(fresh);
    }
  }
  if (info != nullptr) {
    *info = std::move(local);
  }
  return out;
}

} // namespace

std::vector<OwnedTensor>
aggregate(const Safetensors& base, std::span<const Safetensors> updates, std::span<const double> weights,
          const StrategySpec& spec, const ServerOptions& options, ServerState& state, AggregateInfo* info)
{
  Access access;
  return aggregate_impl(base, updates, weights, spec, options, state, info, access);
}

namespace {

std::vector<OwnedTensor>
aggregate_files(const SafetensorsFile& base, std::span<const SafetensorsFile* const> updates,
                std::span<const double> weights, const StrategySpec& spec, const ServerOptions& options,
                ServerState& state, AggregateInfo* info, std::optional<std::size_t> in_place_budget)
{
  std::vector<Safetensors> contents;
  contents.reserve(updates.size());
  Access access;
  access.mapped = true;
  for (const auto* u : updates) {
    contents.push_back(u->content());
    access.origin.push_back(u->bytes().data());
  }
  // Read updates in place while what that keeps resident fits in 2 × model + 32 MiB, so that
  // with the new model's own copy peak RSS stays within about 3 × model + 50 MB; read the others
  // with pread(). In place, each thread keeps up to a page-cache folio of each file mapped, plus
  // what it has read but not yet released; and since all files are read at the same offsets, the
  // threads cross folio boundaries in every file at once, so this worst case is reached.
  std::size_t model_bytes = 0;
  std::size_t coordinates = 0;
  for (const auto& t : base.content().tensors) {
    model_bytes += t.data.size();
    coordinates += t.numel();
  }
  const unsigned threads = thread_count(options, coordinates);
  const std::size_t per_file = threads * k_folio_bytes + release_window(updates.size() + 1, threads);
  const std::size_t budget = in_place_budget.value_or(2 * model_bytes + k_mapped_slack);
  std::size_t resident = std::min(model_bytes, per_file);
  std::vector<bool> use_pread(updates.size(), false);
  for (std::size_t i = 0; i < updates.size(); ++i) {
    const std::size_t cost = std::min(updates[i]->bytes().size(), per_file);
    if (resident + cost <= budget) {
      resident += cost;
    } else {
      use_pread[i] = true;
    }
  }
  const Descriptors fds(updates, use_pread);
  access.fds = fds.fds();
  return aggregate_impl(base.content(), contents, weights, spec, options, state, info, access);
}

} // namespace

std::vector<OwnedTensor>
aggregate(const SafetensorsFile& base, std::span<const SafetensorsFile* const> updates, std::span<const double> weights,
          const StrategySpec& spec, const ServerOptions& options, ServerState& state, AggregateInfo* info)
{
  return aggregate_files(base, updates, weights, spec, options, state, info, std::nullopt);
}

std::vector<OwnedTensor>
aggregate(const SafetensorsFile& base, std::span<const SafetensorsFile> updates, std::span<const double> weights,
          const StrategySpec& spec, const ServerOptions& options, ServerState& state, AggregateInfo* info)
{
  std::vector<const SafetensorsFile*> pointers;
  pointers.reserve(updates.size());
  for (const auto& u : updates) {
    pointers.push_back(&u);
  }
  return aggregate_files(base, pointers, weights, spec, options, state, info, std::nullopt);
}

namespace detail {

std::vector<OwnedTensor>
aggregate_reading(const SafetensorsFile& base, std::span<const SafetensorsFile* const> updates,
                  std::span<const double> weights, const StrategySpec& spec, const ServerOptions& options,
                  ServerState& state, std::size_t in_place_budget, AggregateInfo* info)
{
  return aggregate_files(base, updates, weights, spec, options, state, info, in_place_budget);
}

} // namespace detail

} // namespace fedl::core
