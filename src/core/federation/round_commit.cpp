// SPDX-License-Identifier: Apache-2.0
// One round's commit (round.hpp): aggregate the accepted updates and check their values in the
// same pass, leave out the unfit ones, write the model, the server state and the signed ledger
// entry; and serve's attempt at a round around it.
#include "core/federation/round.hpp"

#include "core/federation/round_detail.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/update.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <system_error>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

using namespace round_detail;

namespace {

// An accepted update's digest computed again from its file as it is now.
std::string
digest_again(const AcceptedUpdate& c)
{
  if (c.digest.version == 2) {
    return update_digest_v2(SafetensorsFile(c.path).content());
  }
  return file_sha256(c.path);
}

// The keys of a round entry's body that caller-supplied fields must not replace: an auditor
// relies on them meaning what commit_round wrote.
constexpr const char* reserved_body_keys[] = {"round",    "strategy",   "options", "base",   "model", "participants",
                                              "rejected", "evaluation", "privacy", "limits", "best"};

// Whether every value of a float tensor is finite (other dtypes have no NaN).
bool
all_finite(const OwnedTensor& t)
{
  const auto scan = [&](auto zero) {
    using T = decltype(zero);
    for (std::size_t i = 0; i + sizeof(T) <= t.bytes.size(); i += sizeof(T)) {
      T v;
      std::memcpy(&v, t.bytes.data() + i, sizeof(T));
      if (!std::isfinite(v)) {
        return false;
      }
    }
    return true;
  };
  return t.dtype == DType::f32 ? scan(0.0F) : t.dtype == DType::f64 ? scan(0.0) : true;
}

// Why an accepted update's values are not fit (NaN or infinite, or a norm past the limits), or
// nothing: decided from what the aggregation read of them (`seen`), reading the file again only
// where that vouches for nothing or comes near the norm limit. update_norm sums in another order
// than the passes, so their norms may differ in the last bits; within `margin` of the limit the
// decision is update_norm's, as if the aggregation had never read it.
std::optional<std::string>
check_values(const AcceptedUpdate& u, const UpdateValues& seen, const std::optional<LimitsConfig>& limits)
{
  const bool vouched = seen.read_whole && seen.finite;
  if (!vouched) {
    if (auto reason = validate_update_values(u.file)) {
      return reason;
    }
  }
  constexpr double margin = 1e-6;
  if (limits && !(vouched && std::sqrt(seen.sum_squares) <= limits->max_update_norm * (1 - margin))) {
    const double norm = update_norm(u.file.content());
    u.file.release();
    if (!(norm <= limits->max_update_norm)) {
      return fmt::format("its L2 norm {:.6g} is over the federation's limit of {:g} (fedl.json "
                         "limits.max_update_norm)",
                         norm, limits->max_update_norm);
    }
  }
  return std::nullopt;
}

void
check_extra(const nlohmann::json& extra)
{
  if (extra.is_null()) {
    return;
  }
  if (!extra.is_object()) {
    throw Error("the extra fields of a round's ledger entry must be a JSON object, not {}", extra.dump());
  }
  for (const auto* key : reserved_body_keys) {
    if (extra.contains(key)) {
      throw Error("the extra ledger field \"{}\" would replace the round entry's own; give it another name", key);
    }
  }
}

} // namespace

ShortOfQuorum::ShortOfQuorum(std::size_t left, std::size_t rejected)
  : VerifyError("{} left to aggregate ({} rejected)",
                left == 0 ? std::string("no update") : fmt::format("only {} update{}", left, left == 1 ? "" : "s"),
                rejected)
{
}

namespace {

// Leaves out of the round the accepted updates whose values are not fit (check_values, on a few
// threads), in candidate order, as validate_round leaves out the others; true if any was.
bool
drop_unfit_values(ValidatedRound& validated, const AggregateInfo& info)
{
  auto& accepted = validated.accepted;
  std::vector<std::optional<std::string>> unfit(accepted.size());
  check_in_parallel(accepted.size(), [&](std::size_t i) noexcept {
    try {
      unfit[i] = check_values(accepted[i], info.values.at(i), validated.plan.limits);
    } catch (...) {
      unfit[i] = "its values cannot be checked";
    }
  });
  std::vector<AcceptedUpdate> kept;
  for (std::size_t i = 0; i < accepted.size(); ++i) {
    if (!unfit[i]) {
      kept.push_back(std::move(accepted[i]));
      continue;
    }
    const auto reason = valid_utf8(*unfit[i], max_reason_bytes);
    if (validated.on_bad == OnBadUpdate::fail) {
      throw BadUpdateError(accepted[i].path, reason);
    }
    FEDL_LOG_WARN("leaving out {}: {}", accepted[i].path.string(), reason);
    // An accepted update's fedl.site is verified only where it is signed.
    const auto& site = accepted[i].fingerprint.empty() ? std::string() : accepted[i].site;
    validated.rejected.push_back({{"file", accepted[i].path.filename().string()}, {"site", site}, {"reason", reason}});
  }
  const bool dropped = kept.size() < accepted.size();
  accepted = std::move(kept);
  return dropped;
}

// The server state the round starts from (empty for a stateless strategy or before round 1).
ServerState
load_state(const ValidatedRound& validated, const StrategySpec& spec)
{
  const auto& plan = validated.plan;
  if (spec.stateful() && plan.state_in && fs::exists(*plan.state_in)) {
    return load_server_state(*plan.state_in, spec, validated.base.content().tensors);
  }
  return {};
}

// Writes the new model (atomically) and the advanced server state; the model's SHA-256.
std::string
write_model(const ValidatedRound& validated, const StrategySpec& spec, const std::vector<OwnedTensor>& model,
            const ServerState& state)
{
  const auto& plan = validated.plan;
  // The last line of defence for the model every site trains next: bounded updates cannot make
  // it infinite, but a strategy's arithmetic on extreme (finite) values still could.
  for (const auto& t : model) {
    if (!all_finite(t)) {
      throw VerifyError("the aggregate of round {} has a value that is not finite in tensor {}; nothing was "
                        "written (lower fedl.json limits.max_update_norm, or use a robust strategy)",
                        plan.round, t.name);
    }
  }
  Metadata meta = validated.base.content().metadata;
  meta["fedl.kind"] = "model";
  meta["fedl.round"] = std::to_string(plan.round);
  if (!plan.workspace) {
    meta.erase("fedl.round");
  }
  auto sha = write_safetensors(plan.out, views_of(model), meta);
  if (spec.stateful() && plan.state_out) {
    save_server_state(*plan.state_out, state);
  }
  return sha;
}

// Aggregates the accepted updates and checks their values with what that read; while one is not
// fit, leaves it out and aggregates again from the state as it was (ShortOfQuorum if fewer than
// settings.quorum are left). Checks the result and the updates' files, and writes the model and
// the advanced server state. AggregateInfo goes to `info`.
std::string
aggregate_and_write(ValidatedRound& validated, const RoundSettings& settings, AggregateInfo& info)
{
  const auto& plan = validated.plan;
  const auto& spec = settings.strategy;
  if (spec.stateful() && !plan.state_in) {
    FEDL_LOG_WARN("{} keeps server optimizer state between rounds; without --state (or --workspace) each run "
                  "starts it afresh",
                  spec.to_string());
  }
  ServerState state;
  std::vector<OwnedTensor> model;
  for (;;) {
    state = load_state(validated, spec);
    std::vector<const SafetensorsFile*> files;
    std::vector<double> weights;
    for (const auto& c : validated.accepted) {
      files.push_back(&c.file);
      weights.push_back(static_cast<double>(c.samples));
    }
    model = aggregate(validated.base, files, weights, spec, settings.options, state, &info);
    if (!drop_unfit_values(validated, info)) {
      break;
    }
    if (validated.accepted.size() < std::max<std::size_t>(settings.quorum, 1)) {
      throw ShortOfQuorum(validated.accepted.size(), validated.rejected.size());
    }
  }
  // The files are read through their mappings: one changed on disk after its signature was
  // checked must not pass unnoticed. (Without a digest, for an unsigned update that nothing
  // records, the check of the aggregate's values above is what a change could break.) On a few
  // threads, like the first hashes; a file that cannot be read again counts as changed.
  const auto& accepted = validated.accepted;
  std::vector<char> changed(accepted.size(), 0);
  check_in_parallel(accepted.size(), [&](std::size_t i) noexcept {
    const auto& c = accepted[i];
    try {
      changed[i] = static_cast<char>(!c.owned && !c.digest.hex.empty() && digest_again(c) != c.digest.hex);
    } catch (...) {
      changed[i] = 1;
    }
  });
  for (std::size_t i = 0; i < accepted.size(); ++i) {
    if (changed[i] != 0) {
      throw VerifyError("update {} changed while it was being aggregated; nothing was written",
                        accepted[i].path.string());
    }
  }
  return write_model(validated, spec, model, state);
}

// The "round" ledger entry's body.
nlohmann::json
round_entry(const ValidatedRound& validated, const RoundSettings& settings, const RoundResult& result,
            const std::map<std::string, DpSgdReport>& sites)
{
  const auto& plan = validated.plan;
  const auto& ws = *plan.workspace;
  auto options = to_json(settings.options.optimizer);
  if (settings.options.clip_norm) {
    options["clip_norm"] = *settings.options.clip_norm;
  }
  nlohmann::json body = {
    {"round", plan.round},
    {"strategy", result.strategy},
    {"options", options},
    {"base", {{"file", fs::relative(plan.base, ws.root()).string()}, {"sha256", validated.base_sha256}}},
    {"model", {{"file", Workspace::model_name(plan.round)}, {"sha256", result.sha256}}},
    {"participants", result.participants},
    {"rejected", result.rejected}};
  if (plan.limits) {
    body["limits"] = {{"max_update_norm", plan.limits->max_update_norm},
                      {"max_num_samples", plan.limits->max_num_samples}};
  }
  if (!result.evaluation.is_null()) {
    body["evaluation"] = result.evaluation;
  }
  auto history = plan.privacy;
  if (auto privacy = history.record_round(settings.client_dp, sites, settings.max_epsilon, settings.accountant);
      !privacy.is_null()) {
    body["privacy"] = std::move(privacy);
  }
  if (settings.extra.is_object()) {
    body.update(settings.extra);
  }
  return body;
}

// The common end of a round once its model is written: evaluate it, and in a workspace append
// the signed "round" entry (with `sites`' DP-SGD reports) and remove the state two rounds back.
void
finish_round(const ValidatedRound& validated, const RoundSettings& settings,
             const std::map<std::string, DpSgdReport>& sites, RoundResult& result)
{
  const auto& plan = validated.plan;
  result.model = plan.out;
  result.strategy = settings.strategy.to_string();
  result.rejected = validated.rejected;
  result.round = plan.round;
  if (settings.evaluate) {
    result.evaluation = settings.evaluate(plan.out);
  }
  if (!plan.workspace) {
    return;
  }
  const auto& ws = *plan.workspace;
  auto body = round_entry(validated, settings, result, sites);
  std::optional<BestModel> best;
  if (settings.best_metric) {
    best = next_best(plan.best, *settings.best_metric, plan.round, result.evaluation);
    if (best) {
      body["best"] = best->to_json();
    }
  }
  append_signed(ws, "round", body);
  result.ledger_body = std::move(body);
  if (best && best->round == plan.round) {
    try {
      link_best_model(ws, plan.round);
    } catch (const Error& e) {
      // The ledger says which model is best; the coordinator links it again when it resumes.
      FEDL_LOG_WARN("{}", e.what());
    }
  }
  // The state two rounds back can no longer be needed for a re-run.
  if (plan.round >= 2) {
    std::error_code ec;
    fs::remove(ws.state() / state_name(plan.round - 2), ec);
  }
}

} // namespace

RoundResult
commit_round(ValidatedRound& validated, const RoundSettings& settings)
{
  check_extra(settings.extra);
  validate_server_options(settings.options);
  if (validated.accepted.empty()) {
    throw ShortOfQuorum(0, validated.rejected.size());
  }
  RoundResult result;
  result.sha256 = aggregate_and_write(validated, settings, result.info);
  for (const auto& c : validated.accepted) {
    nlohmann::json p = {{"file", c.path.filename().string()},
                        {"site", c.site},
                        {"fingerprint", c.fingerprint},
                        {"num_samples", c.samples}};
    if (c.digest.version == 2) {
      p["signature_version"] = 2;
      p["update_digest"] = c.digest.hex;
    } else if (!c.digest.hex.empty()) {
      p["update_sha256"] = c.digest.hex;
    }
    result.participants.push_back(std::move(p));
  }
  std::map<std::string, DpSgdReport> sites;
  for (const auto& c : validated.accepted) {
    if (c.dp) {
      sites.emplace(c.site.empty() ? c.path.filename().string() : c.site, *c.dp);
    }
  }
  finish_round(validated, settings, sites, result);
  return result;
}

namespace {

// The plan of serve's attempt at `round` (Error if the ledger is past it).
RoundPlan
plan_attempt(const Workspace& ws, std::uint64_t round, LedgerState* ledger)
{
  auto plan = plan_workspace_round(ws, ledger);
  if (plan.round != round) {
    throw Error("the ledger is at round {} where this coordinator expected {}: another process wrote a round; "
                "restart fedl serve",
                plan.round, round);
  }
  return plan;
}

// Records an attempt that made no round ("round-failed": `extra`, the reason, the rejected updates).
AttemptOutcome
fail_attempt(const Workspace& ws, std::uint64_t round, nlohmann::json body, std::string reason,
             const nlohmann::json& rejected)
{
  body["round"] = round;
  body["reason"] = reason;
  body["rejected"] = rejected;
  append_signed(ws, "round-failed", body);
  return {nlohmann::json(), std::move(reason)};
}

} // namespace

AttemptOutcome
commit_attempt(const Workspace& ws, std::uint64_t round, std::span<const RoundCandidate> candidates,
               std::uint32_t quorum, const RoundSettings& settings, LedgerState* ledger)
{
  const WorkspaceLock lock(ws, WorkspaceLock::Kind::change, 30);
  const auto plan = plan_attempt(ws, round, ledger);
  auto validated = validate_round(plan, candidates, OnBadUpdate::skip);
  // Too few valid updates: the attempt is recorded, with why, and the caller may try again.
  const auto short_of_quorum = [&] {
    return fail_attempt(ws, round, settings.extra,
                        fmt::format("{} valid updates of {} asked, below the quorum of {}", validated.accepted.size(),
                                    settings.extra.value("asked", std::size_t{0}), quorum),
                        validated.rejected);
  };
  if (validated.accepted.size() < quorum) {
    return short_of_quorum();
  }
  auto with_quorum = settings;
  with_quorum.quorum = quorum;
  AttemptOutcome out;
  try {
    out.committed = commit_round(validated, with_quorum).ledger_body;
  } catch (const ShortOfQuorum&) {
    return short_of_quorum();
  }
  return out;
}

AttemptOutcome
commit_secure_attempt(const Workspace& ws, std::uint64_t round, const SecureSum& sum, const RoundSettings& settings,
                      LedgerState* ledger)
{
  const WorkspaceLock lock(ws, WorkspaceLock::Kind::change, 30);
  const auto plan = plan_attempt(ws, round, ledger);
  auto with_record = settings;
  with_record.extra["secure_aggregation"] = sum.record;
  if (!sum.failure.empty()) {
    return fail_attempt(ws, round, with_record.extra, "secure aggregation: " + sum.failure, nlohmann::json::array());
  }
  check_extra(with_record.extra);
  validate_server_options(settings.options);
  auto validated = validate_round(plan, {}, OnBadUpdate::skip); // the base, checked against the ledger
  const auto& base = validated.base.content();
  // One update for the strategy's server step: the weighted mean; under client-level DP (where
  // every site weighs 1) the sum of the sites' clipped updates, to which the strategy adds its
  // noise and which it divides by the sites asked, as without secure aggregation. Each site
  // clipped its own update (the coordinator cannot): the sum of honest ones is within count × C,
  // the clip applied to it. With distributed DP the sites added the noise: the update is the sum
  // over the sites asked, and the strategy adds none.
  auto options = settings.options;
  options.clip_norm.reset();
  const bool distributed = options.client_dp && sum.encoding.noise > 0;
  std::optional<double> divisor;
  if (options.client_dp) {
    divisor = distributed ? options.client_dp->denominator : 1.0;
  }
  auto decoded = secagg::decode(sum.words, base.tensors, sum.encoding, divisor);
  with_record.extra["secure_aggregation"]["total_weight"] = decoded.total_weight;
  if (distributed) {
    // The noise's standard deviation in the sum over one site's sensitivity, in words: at least
    // the configured multiplier, which the sites' shares were sized for and the ledger accounts.
    const auto summed = sum.record.at("survivors").size();
    const double noise = std::sqrt(static_cast<double>(summed)) * sum.encoding.noise * sum.encoding.scale();
    const double sensitivity = sum.encoding.sensitivity(settings.client_dp->clip_norm, sum.words.size() - 1);
    with_record.extra["secure_aggregation"]["distributed_dp"] = {{"noise", sum.encoding.noise},
                                                                 {"noise_words", noise},
                                                                 {"sensitivity_words", sensitivity},
                                                                 {"noise_multiplier", noise / sensitivity}};
    options.client_dp.reset();
  } else if (options.client_dp) {
    options.clip_norm = decoded.total_weight * *settings.options.clip_norm * (1 + 1e-6);
  }
  const Safetensors update{views_of(decoded.mean), {}};
  const double weight = 1;
  auto state = load_state(validated, settings.strategy);
  RoundResult result;
  const auto model =
    aggregate(base, std::span(&update, 1), std::span(&weight, 1), settings.strategy, options, state, &result.info);
  result.sha256 = write_model(validated, settings.strategy, model, state);
  for (const auto& site : sum.record.at("survivors")) {
    const auto name = site.get<std::string>();
    result.participants.push_back({{"site", name}, {"fingerprint", sum.fingerprints.at(name)}});
  }
  finish_round(validated, with_record, sum.dp, result);
  return {std::move(result.ledger_body), {}};
}

} // namespace fedl::core
