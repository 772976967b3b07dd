// SPDX-License-Identifier: Apache-2.0
#include "core/federation/round.hpp"

#include "core/federation/ledger_state.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <system_error>
#include <thread>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

// The federation's trust anchors, for checking site signatures.
struct Trust
{
  Cert ca;
  Crl crl;
};

std::string
state_name(std::uint64_t round)
{
  return fmt::format("server-{:06}.safetensors", round);
}

// Why a signed update cannot be trusted, or nothing. Without `trust` (no workspace) an unsigned
// update is fine and a signed one is checked against its own certificate only. `signer` is set
// to the site whose key made the signature once that is known: the signature verifies with a
// certificate that the federation's CA issued (revoked or not), or, outside a workspace, with
// the update's own certificate.
std::optional<std::string>
check_identity(const Safetensors& st, const UpdateDigest& digest, const Trust* trust, std::string& signer)
{
  const auto sig = st.meta("fedl.signature");
  const auto pem = st.meta("fedl.certificate");
  if (!sig || !pem) {
    if (trust != nullptr) {
      return "it is not signed by a site of this federation (make it with fedl train --identity clients/NAME)";
    }
    return std::nullopt;
  }
  Cert cert;
  CertificateInfo info;
  try {
    cert = certificate_from_pem(*pem, "fedl.certificate");
    info = certificate_info(cert); // a malformed field that OpenSSL still parsed throws here
  } catch (const Error& e) {
    return std::string("its certificate is unreadable: ") + e.what();
  }
  if (st.meta("fedl.site") != info.common_name) {
    return fmt::format("fedl.site does not match its certificate's name {}", info.common_name);
  }
  if (st.meta("fedl.cert_sha256") != info.fingerprint) {
    return "fedl.cert_sha256 does not match its certificate";
  }
  const auto message =
    digest.version == 2 ? update_signed_message_v2(digest.hex) : update_signed_payload(st.tensors, st.metadata);
  if (!verify_signature(cert, as_bytes(message), *sig)) {
    return fmt::format("the signature of site {} does not verify (the file was changed after signing)",
                       info.common_name);
  }
  if (trust == nullptr || static_cast<bool>(verify_certificate(cert, trust->ca, nullptr, CertPurpose::client))) {
    signer = info.common_name;
  }
  if (trust != nullptr) {
    const auto verdict = verify_certificate(cert, trust->ca, &trust->crl, CertPurpose::client);
    if (!verdict) {
      return fmt::format("the certificate of site {} is not valid here: {}", info.common_name, verdict.reason);
    }
  }
  return std::nullopt;
}

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
constexpr const char* reserved_body_keys[] = {"round",        "strategy", "options",    "base",    "model",
                                              "participants", "rejected", "evaluation", "privacy", "limits"};

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

// A rejection reason as the ledger and the log keep it: it may quote what a site chose.
constexpr std::size_t max_reason_bytes = 1000;

// Why an update's sample count is past the federation's limits, or nothing.
std::optional<std::string>
check_samples(std::uint64_t samples, const LimitsConfig& limits)
{
  if (samples > limits.max_num_samples) {
    return fmt::format("fedl.num_samples {} is over the federation's limit of {} (fedl.json limits.max_num_samples)",
                       samples, limits.max_num_samples);
  }
  return std::nullopt;
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

// An update's fedl.dp (parsed into `dp`) against what the federation requires; the reason it is
// not fit, or nothing.
std::optional<std::string>
check_dp(const Safetensors& st, const std::optional<DpSgdConfig>& required, std::optional<DpSgdReport>& dp)
{
  if (const auto text = st.meta("fedl.dp")) {
    try {
      dp = DpSgdReport::from_json(nlohmann::json::parse(*text), "fedl.dp");
    } catch (const std::exception& e) {
      return fmt::format("its fedl.dp is not a DP-SGD report: {}", e.what());
    }
  }
  if (!required) {
    return std::nullopt;
  }
  if (!dp) {
    return fmt::format("it was trained without DP-SGD (no fedl.dp), but fedl.json's training asks for noise multiplier "
                       "{:g} and clip {:g}",
                       required->noise_multiplier, required->max_grad_norm);
  }
  if (dp->noise_multiplier < required->noise_multiplier || dp->max_grad_norm > required->max_grad_norm) {
    return fmt::format("it was trained with DP-SGD noise multiplier {:g} and clip {:g}, weaker than fedl.json's {:g} "
                       "and {:g}",
                       dp->noise_multiplier, dp->max_grad_norm, required->noise_multiplier, required->max_grad_norm);
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

BadUpdateError::BadUpdateError(std::filesystem::path path, std::string reason)
  : VerifyError("update {}: {}", path.string(), reason), m_path(std::move(path)), m_reason(std::move(reason))
{
}

ShortOfQuorum::ShortOfQuorum(std::size_t left, std::size_t rejected)
  : VerifyError("{} left to aggregate ({} rejected)",
                left == 0 ? std::string("no update") : fmt::format("only {} update{}", left, left == 1 ? "" : "s"),
                rejected)
{
}

RoundPlan
plan_workspace_round(const Workspace& ws, LedgerState* ledger)
{
  // Entry by entry: a coordinator plans every round, and the ledger grows with them; it keeps
  // the state from round to round and reads only what was appended since.
  LedgerState fresh;
  LedgerState& kept = ledger != nullptr ? *ledger : fresh;
  kept.advance(ws);
  auto state = kept;
  const auto& latest = state.model;
  RoundPlan plan;
  plan.privacy = std::move(state.privacy);
  const auto config = load_config(ws.config());
  plan.required_dp = config.training.dp;
  plan.limits = config.limits;
  plan.workspace = ws;
  plan.round = latest.round + 1;
  plan.base = ws.root() / latest.file;
  plan.recorded_base_sha256 = latest.sha256;
  plan.out = ws.model(plan.round);
  // Per round, so that re-running an interrupted round starts again from the same state.
  plan.state_in = ws.state() / state_name(plan.round - 1);
  plan.state_out = ws.state() / state_name(plan.round);
  return plan;
}

RoundPlan
plan_standalone_round(const std::filesystem::path& base, const std::filesystem::path& out,
                      const std::optional<std::filesystem::path>& state)
{
  RoundPlan plan;
  plan.base = base;
  plan.out = out;
  plan.state_in = state;
  plan.state_out = state;
  return plan;
}

namespace {

// One candidate after the checks that need no other candidate.
struct CheckedUpdate
{
  std::optional<SafetensorsFile> file;
  UpdateDigest digest;
  std::string site, fingerprint;
  std::uint64_t samples = 0;
  std::optional<std::string> unreadable; // why it could not be opened or hashed
  std::optional<std::string> invalid;    // why its content or signature is bad
  std::optional<DpSgdReport> dp;
  std::string signer; // the site whose key verifiably made it (see check_identity), or ""
};

// The digest that identifies an update (UpdateDigest). For a file the caller received itself,
// the digest computed as it arrived, if it describes the same head; else one pass over the file.
UpdateDigest
digest_of(const SafetensorsFile& file, const RoundCandidate& candidate, bool record)
{
  const auto& st = file.content();
  const int version = update_signature_version(st.metadata).value_or(0);
  const auto& streamed = candidate.streamed;
  if (version != 2) {
    if (candidate.owned && streamed && streamed->version == version) {
      return {version, streamed->hex, {}};
    }
    if (!record && !st.meta("fedl.signature")) {
      return {version, {}, {}};
    }
    return {version, file_sha256(candidate.path), {}};
  }
  if (candidate.owned && streamed && streamed->version == 2 && streamed->head == update_head_v2(st)) {
    return *streamed;
  }
  return {2, update_digest_v2(st), {}};
}

// Opens, hashes and checks one candidate against the base, the trust, the required DP and the
// limits. On a worker thread, where nothing may escape: whatever an update makes a check throw
// is a reason to reject that update, not the end of the process.
CheckedUpdate
check_candidate(const RoundCandidate& candidate, const RoundPlan& plan, const SafetensorsFile& base,
                const std::string& base_sha, const Trust* trust) noexcept
{
  CheckedUpdate c;
  try {
    try {
      c.file.emplace(candidate.path);
      c.digest = digest_of(*c.file, candidate, plan.record_digests);
    } catch (const Error& e) {
      c.unreadable = e.what();
    }
    if (!c.file || c.unreadable) {
      return c;
    }
    const auto& st = c.file->content();
    // The values are checked as the round aggregates them (check_values), in the same pass.
    c.invalid = validate_update_form(base.content(), base_sha, st);
    if (!c.invalid && c.digest.version == 0) {
      c.invalid = fmt::format(
        "its fedl.signature_version {} is not one this fedl checks (1 or 2): a newer fedl signed it; upgrade this one",
        quote_text(st.meta("fedl.signature_version").value_or("")));
    }
    if (!c.invalid) {
      c.invalid = check_identity(st, c.digest, trust, c.signer);
    }
    c.site = st.meta("fedl.site").value_or("");
    c.fingerprint = st.meta("fedl.cert_sha256").value_or("");
    c.samples = update_num_samples(st).value_or(0);
    if (!c.invalid) {
      c.invalid = check_dp(st, plan.required_dp, c.dp);
    }
    if (!c.invalid && plan.limits) {
      c.invalid = check_samples(c.samples, *plan.limits);
    }
    // Checked: its pages need not stay resident while the others are (N updates would
    // otherwise hold N × model bytes until the round is committed).
    c.file->release();
  } catch (const std::exception& e) {
    c.invalid = fmt::format("it cannot be checked: {}", e.what());
  } catch (...) {
    c.invalid = "it cannot be checked";
  }
  return c;
}

// Which updates of a round hold the same bytes as an earlier one: by their digests, or for those
// without one (nothing records it) by a sample of their bytes, hashing a file in full only when
// its sample matches another's, so that each file is hashed at most once. `bytes` are a mapping
// that outlives the check (it moves with its SafetensorsFile, but stays where it is).
class SameBytes
{
public:
  bool seen(std::span<const std::byte> bytes, const std::string& digest)
  {
    if (!digest.empty()) {
      return !m_digests.insert(digest).second;
    }
    auto& group = m_sampled[sample(bytes)];
    group.push_back(bytes);
    if (group.size() == 1) {
      return false;
    }
    const auto mine = full(bytes);
    return std::any_of(group.begin(), group.end() - 1, [&](auto other) { return full(other) == mine; });
  }

private:
  // The size, the header and 64 slices spread over the data: what sets two updates apart at once.
  static std::string sample(std::span<const std::byte> bytes)
  {
    Sha256 h;
    const auto size = bytes.size();
    h.update(as_bytes(std::to_string(size)));
    constexpr std::size_t slice = 256;
    constexpr std::size_t slices = 64;
    h.update(bytes.first(std::min(size, std::size_t{64} << 10)));
    for (std::size_t i = 1; i <= slices && size > slice; ++i) {
      h.update(bytes.subspan((size - slice) / slices * i, slice));
    }
    return h.hex();
  }
  std::string full(std::span<const std::byte> bytes)
  {
    auto [it, added] = m_full.try_emplace(bytes.data());
    if (added) {
      it->second = sha256_hex(bytes);
    }
    return it->second;
  }

  std::set<std::string> m_digests;
  std::map<std::string, std::vector<std::span<const std::byte>>> m_sampled;
  std::map<const std::byte*, std::string> m_full;
};

// Runs check(i) for i in [0, n) on up to 4 threads (this one among them).
void
check_in_parallel(std::size_t n, const std::function<void(std::size_t)>& check)
{
  const std::size_t threads =
    std::min<std::size_t>(n, std::clamp<std::size_t>(std::thread::hardware_concurrency(), 1, 4));
  std::atomic<std::size_t> next{0};
  const auto work = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      check(i);
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) {
    pool.emplace_back(work);
  }
  work();
  for (auto& t : pool) {
    t.join();
  }
}

} // namespace

ValidatedRound
validate_round(const RoundPlan& plan, std::span<const RoundCandidate> candidates, OnBadUpdate on_bad)
{
  std::optional<Trust> trust;
  if (plan.workspace) {
    trust = Trust{read_certificate(plan.workspace->ca_cert()), read_crl(plan.workspace->crl())};
  }
  SafetensorsFile base(plan.base);
  auto base_sha = base.sha256();
  if (plan.workspace && base_sha != plan.recorded_base_sha256) {
    throw VerifyError("{} does not match the ledger (SHA-256 {}, recorded {}): it was replaced or altered; "
                      "run fedl audit",
                      plan.base.string(), base_sha, plan.recorded_base_sha256);
  }
  // The checks of one update read all of it two or three times (hash, values, signature); they
  // are independent, so they run on a few threads. What depends on the order (the same bytes or
  // the same site twice: the later one is bad) is decided afterwards, in candidate order.
  std::vector<CheckedUpdate> checked(candidates.size());
  check_in_parallel(candidates.size(), [&](std::size_t i) {
    checked[i] = check_candidate(candidates[i], plan, base, base_sha, trust ? &*trust : nullptr);
  });

  std::vector<AcceptedUpdate> accepted;
  nlohmann::json rejected = nlohmann::json::array();
  std::set<std::string> sites;
  SameBytes contents;
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    const auto& candidate = candidates[i];
    const auto& path = candidate.path;
    auto& c = checked[i];
    std::optional<std::string> reason = c.unreadable;
    if (!reason && c.file && contents.seen(c.file->bytes(), c.digest.hex)) {
      reason = "the same update file is given twice";
    }
    if (!reason) {
      reason = c.invalid;
    }
    // After the signature check, so that in a workspace `site` is what the certificate says.
    if (!reason && !candidate.expected_site.empty() && c.site != candidate.expected_site) {
      reason =
        c.site.empty()
          ? fmt::format("it names no site (fedl.site) but was delivered by site {}", candidate.expected_site)
          : fmt::format("it was made by site {} (fedl.site) but delivered by site {}", c.site, candidate.expected_site);
    }
    if (!reason && !c.site.empty() && !sites.insert(c.site).second) {
      reason = fmt::format("site {} sent more than one update this round", c.site);
    }
    if (reason) {
      *reason = valid_utf8(*reason, max_reason_bytes);
      if (on_bad == OnBadUpdate::fail) {
        throw BadUpdateError(path, *reason);
      }
      FEDL_LOG_WARN("leaving out {}: {}", path.string(), *reason);
      // Who delivered it, or whose key verifiably signed it; never merely what it claims.
      const auto& site = !candidate.expected_site.empty() ? candidate.expected_site : c.signer;
      rejected.push_back({{"file", path.filename().string()}, {"site", site}, {"reason", *reason}});
      continue;
    }
    accepted.push_back(AcceptedUpdate{path, std::move(c.site), std::move(c.fingerprint), c.samples, std::move(c.digest),
                                      std::move(*c.file), candidate.owned, c.dp});
  }
  return ValidatedRound{plan, std::move(base), std::move(base_sha), std::move(accepted), std::move(rejected), on_bad};
}

ServerOptions
configured_server_options(const FederationConfig& config)
{
  ServerOptions o;
  o.optimizer = config.server_optimizer;
  return o;
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
    state = {};
    if (spec.stateful() && plan.state_in && fs::exists(*plan.state_in)) {
      state = load_server_state(*plan.state_in, spec, validated.base.content().tensors);
    }
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
  // The last line of defence for the model every site trains next: bounded updates cannot make
  // it infinite, but a strategy's arithmetic on extreme (finite) values still could.
  for (const auto& t : model) {
    if (!all_finite(t)) {
      throw VerifyError("the aggregate of round {} has a value that is not finite in tensor {}; nothing was "
                        "written (lower fedl.json limits.max_update_norm, or use a robust strategy)",
                        plan.round, t.name);
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

// The "round" ledger entry's body.
nlohmann::json
round_entry(const ValidatedRound& validated, const RoundSettings& settings, const RoundResult& result)
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
  std::map<std::string, DpSgdReport> sites;
  for (const auto& c : validated.accepted) {
    if (c.dp) {
      sites.emplace(c.site.empty() ? c.path.filename().string() : c.site, *c.dp);
    }
  }
  auto history = plan.privacy;
  if (auto privacy = history.record_round(settings.client_dp, sites, settings.max_epsilon); !privacy.is_null()) {
    body["privacy"] = std::move(privacy);
  }
  if (settings.extra.is_object()) {
    body.update(settings.extra);
  }
  return body;
}

} // namespace

RoundResult
commit_round(ValidatedRound& validated, const RoundSettings& settings)
{
  const auto& plan = validated.plan;
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
  result.model = plan.out;
  result.strategy = settings.strategy.to_string();
  result.rejected = validated.rejected;
  result.round = plan.round;
  if (settings.evaluate) {
    result.evaluation = settings.evaluate(plan.out);
  }
  if (!plan.workspace) {
    return result;
  }
  const auto& ws = *plan.workspace;
  auto body = round_entry(validated, settings, result);
  append_signed(ws, "round", body);
  result.ledger_body = std::move(body);
  // The state two rounds back can no longer be needed for a re-run.
  if (plan.round >= 2) {
    std::error_code ec;
    fs::remove(ws.state() / state_name(plan.round - 2), ec);
  }
  return result;
}

AttemptOutcome
commit_attempt(const Workspace& ws, std::uint64_t round, std::span<const RoundCandidate> candidates,
               std::uint32_t quorum, const RoundSettings& settings, LedgerState* ledger)
{
  const WorkspaceLock lock(ws, WorkspaceLock::Kind::change, 30);
  const auto plan = plan_workspace_round(ws, ledger);
  if (plan.round != round) {
    throw Error("the ledger is at round {} where this coordinator expected {}: another process wrote a round; "
                "restart fedl serve",
                plan.round, round);
  }
  auto validated = validate_round(plan, candidates, OnBadUpdate::skip);
  AttemptOutcome out;
  // Too few valid updates: the attempt is recorded, with why, and the caller may try again.
  const auto fail_attempt = [&] {
    out.retry = fmt::format("{} valid updates of {} asked, below the quorum of {}", validated.accepted.size(),
                            settings.extra.value("asked", std::size_t{0}), quorum);
    nlohmann::json body = settings.extra;
    body["round"] = round;
    body["reason"] = out.retry;
    body["rejected"] = validated.rejected;
    append_signed(ws, "round-failed", body);
    return out;
  };
  if (validated.accepted.size() < quorum) {
    return fail_attempt();
  }
  auto with_quorum = settings;
  with_quorum.quorum = quorum;
  try {
    out.committed = commit_round(validated, with_quorum).ledger_body;
  } catch (const ShortOfQuorum&) {
    return fail_attempt();
  }
  return out;
}

} // namespace fedl::core
