// SPDX-License-Identifier: Apache-2.0
#include "core/federation/round.hpp"

#include "core/federation/round_detail.hpp"

#include "core/federation/ledger_state.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <set>
#include <system_error>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

using namespace round_detail;

namespace {

// The federation's trust anchors, for checking site signatures.
struct Trust
{
  Cert ca;
  Crl crl;
};

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

// An update's fedl.dp against what the federation requires.
std::optional<std::string>
check_dp(const Safetensors& st, const std::optional<DpSgdConfig>& required, std::optional<DpSgdReport>& dp)
{
  return check_dp_report(st.meta("fedl.dp"), required, dp);
}

} // namespace

std::optional<std::string>
check_dp_report(const std::optional<std::string>& text, const std::optional<DpSgdConfig>& required,
                std::optional<DpSgdReport>& dp)
{
  if (text) {
    try {
      // The ε parsed here is the run's by PLD; the round's record recomputes it by the federation's
      // accountant.
      dp = DpSgdReport::from_json(nlohmann::json::parse(*text), "fedl.dp", Accountant::pld_v1);
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

BadUpdateError::BadUpdateError(std::filesystem::path path, std::string reason)
  : VerifyError("update {}: {}", path.string(), reason), m_path(std::move(path)), m_reason(std::move(reason))
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
  plan.best = state.best;
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

} // namespace fedl::core
