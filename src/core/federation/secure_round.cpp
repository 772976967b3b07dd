// SPDX-License-Identifier: Apache-2.0
#include "core/federation/secure_round.hpp"

#include "core/federation/round.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>

namespace fedl::core {

using json = nlohmann::json;

SecureShape
secure_shape(const SecureAggregationConfig& c, std::size_t n)
{
  if (n < 3 || n > SecureAggregationConfig::max_sites) {
    throw UsageError("secure aggregation needs 3 to {} sites in a round, not {}", SecureAggregationConfig::max_sites,
                     n);
  }
  SecureShape s;
  s.neighbours = c.neighbours == 0 ? secagg::default_neighbours(n) : std::min<std::size_t>(c.neighbours, n - 1);
  if (s.neighbours < n - 1 && s.neighbours % 2 == 1) {
    ++s.neighbours; // the graph is built for an even degree
  }
  s.neighbours = std::max<std::size_t>(s.neighbours, 2);
  if (c.threshold == 0) {
    s.threshold = secagg::default_threshold(s.neighbours);
  } else if (c.threshold < 1) {
    s.threshold = static_cast<std::size_t>(std::ceil(c.threshold * static_cast<double>(n) - 1e-9));
  } else {
    s.threshold = static_cast<std::size_t>(c.threshold);
  }
  s.threshold = std::max<std::size_t>(s.threshold, 2);
  if (s.threshold > s.neighbours) { // the neighbours are at most n − 1 here
    throw UsageError("a secure-aggregation threshold of {} needs at least {} neighbours per site, and a round of {} "
                     "sites gives each {}; lower --secagg-threshold or raise --secagg-neighbours",
                     s.threshold, s.threshold, n, s.neighbours);
  }
  return s;
}

double
distributed_noise(const PrivacyConfig& dp, secagg::Encoding e, std::size_t values, std::size_t fewest)
{
  // σ·Δ over √fewest per site, Δ a site's sensitivity (in values: Encoding::sensitivity over S).
  // S shrinks as the noise grows (by halves), so this settles in a few steps.
  const double root = std::sqrt(static_cast<double>(fewest));
  e.noise = dp.noise_multiplier * dp.clip_norm / root;
  for (int i = 0; i < 64; ++i) {
    const double want = dp.noise_multiplier * e.sensitivity(dp.clip_norm, values) / e.scale() / root;
    if (want <= e.noise) {
      break;
    }
    e.noise = want;
  }
  return e.noise;
}

void
check_secure_not_weaker(const json& last, const std::optional<SecureAggregationConfig>& now, std::uint64_t round)
{
  if (!now) {
    throw UsageError("round {} ran with secure aggregation; serve the federation on with it (--secure-aggregation, "
                     "or fedl.json secure_aggregation), not without",
                     round);
  }
  if (!last.is_object()) {
    return;
  }
  const double before = last.value("threshold", 0.0);
  const bool same_kind = (before == 0) == (now->threshold == 0) && (before < 1) == (now->threshold < 1);
  if (same_kind && now->threshold < before) {
    throw UsageError("round {} ran with a secure-aggregation threshold of {:g}; a restart may not lower it to {:g}",
                     round, before, now->threshold);
  }
  if (last.value("distributed_dp", false) && !now->distributed_dp) {
    throw UsageError("round {} ran with distributed DP (the sites added the noise); a restart may not hand the "
                     "un-noised sum to the coordinator: keep --distributed-dp",
                     round);
  }
}

SecureRound::SecureRound(secagg::Params p, secagg::Encoding e, std::uint64_t task, std::map<std::string, Cert> certs,
                         Rules rules, SecureHost& host, double now)
  : m_p(std::move(p)), m_e(e), m_task(task), m_certs(std::move(certs)), m_rules(rules), m_host(host), m_server(m_p)
{
  for (std::size_t i = 0; i < m_p.sites.size(); ++i) {
    m_index[m_p.sites[i]] = static_cast<std::uint32_t>(i + 1);
  }
  // The keys stage waits for the sites to receive their tasks (Rules::keys_timeout); the stages
  // after it for answers that need no training.
  m_rules.quorum = std::max(m_rules.quorum, m_p.threshold);
  m_started = now;
  m_deadline = now + m_rules.keys_timeout;
}

SecAggSetup
SecureRound::setup_for(const std::string& site) const
{
  SecAggSetup s;
  s.sites = m_p.sites;
  s.index = index_of(site);
  s.threshold = m_p.threshold;
  s.neighbours = m_p.neighbours;
  s.graph_seed = m_p.graph_seed;
  s.length = m_p.length;
  s.range = m_e.range;
  s.max_samples = m_e.max_samples;
  s.clip_norm = m_rules.clip_norm;
  s.noise = m_e.noise;
  return s;
}

bool
SecureRound::waiting_for(std::uint32_t index) const
{
  if (out(index)) {
    return false;
  }
  switch (m_stage) {
  case Stage::keys:
    return m_server.advertised().count(index) == 0;
  case Stage::shares:
    return m_server.advertised().count(index) > 0 && m_server.shared().count(index) == 0;
  case Stage::agree:
    return m_server.survivors().count(index) > 0 && m_server.signers().count(index) == 0;
  case Stage::unmask:
    return m_server.signers().count(index) > 0 && m_server.revealed().count(index) == 0;
  default:
    return false;
  }
}

void
SecureRound::drop(const std::string& site, const std::string& why)
{
  if (!is_participant(site) || !m_dropped.emplace(site, why).second) {
    return;
  }
  FEDL_LOG_WARN("round {}: {} leaves the secure aggregation: {}", m_p.round, site, why);
  m_host.secure_drop(site, why);
}

void
SecureRound::fail(const std::string& why)
{
  if (m_stage == Stage::failed || m_stage == Stage::done) {
    return;
  }
  m_stage = Stage::failed;
  m_failure = why;
}

void
SecureRound::keys(const std::string& site, const SecAggKeys& m, double now)
{
  const auto index = active(site);
  if (!index) {
    return;
  }
  if (m_stage != Stage::keys || m.advert.index != *index) {
    drop(site, m_stage != Stage::keys ? "its keys came after the keys stage" : "its keys name another index");
    return;
  }
  if (!verify_signature(m_certs.at(site), advert_payload(m_p, m.advert), m.advert.signature)) {
    drop(site, "its keys are not signed with its certificate's key");
    return;
  }
  if (auto refusal = m_server.add_advert(m.advert)) {
    drop(site, *refusal);
    return;
  }
  if (m_server.advertised().size() == 1) {
    // The others get what the first took to receive its task, twice, or the stage timeout.
    m_deadline = std::min(m_deadline, now + std::max(m_rules.stage_timeout, 2 * (now - m_started)));
  }
  advance(now);
}

void
SecureRound::shares(const std::string& site, const SecAggShares& m, double now)
{
  const auto index = active(site);
  if (!index) {
    return;
  }
  if (m_stage != Stage::shares) {
    drop(site, "its shares came outside the shares stage");
    return;
  }
  if (auto refusal = m_server.add_shares(*index, m.shares)) {
    drop(site, *refusal);
    return;
  }
  advance(now);
}

std::optional<std::string>
SecureRound::check_input(const std::string& site) const
{
  if (!is_participant(site)) {
    return "the site is not in this secure aggregation";
  }
  const auto index = index_of(site);
  if (out(index)) {
    return "the site left this secure aggregation";
  }
  if (m_stage != Stage::input || m_server.shared().count(index) == 0 || m_server.survivors().count(index) > 0) {
    return "a masked input out of turn";
  }
  return std::nullopt;
}

std::optional<std::string>
SecureRound::input(const std::string& site, const SecAggInput& m, std::span<const std::byte> body)
{
  if (auto refusal = check_input(site)) {
    return refusal;
  }
  const auto index = index_of(site);
  const auto sha = sha256_hex(body);
  std::optional<std::string> refusal;
  std::optional<DpSgdReport> dp;
  if (!verify_signature(m_certs.at(site), secagg_input_payload(m_p, index, sha, m), m.signature)) {
    refusal = "its masked input is not signed with its certificate's key";
  } else if (m.complaint) {
    const auto about = *m.complaint;
    const auto& neighbours = m_server.graph()[index - 1];
    if (about == 0 || about > m_p.sites.size() ||
        !std::binary_search(neighbours.begin(), neighbours.end(), about - 1)) {
      refusal = "a complaint about a site that is not its neighbour";
    } else {
      // The coordinator cannot tell who is at fault (it cannot open the shares): both leave.
      m_accused.insert(name_of(about));
      refusal = fmt::format("it says the shares of {} did not open", name_of(about));
      drop(name_of(about), fmt::format("{} says its shares did not open", site));
    }
  } else if (m.range != m_e.range || m.max_samples != m_e.max_samples) {
    refusal = "its report names another encoding than the attempt's";
  } else if (m.clip_norm != m_rules.clip_norm) {
    refusal = m_rules.clip_norm
                ? fmt::format("its report does not say it clipped its update to {:g}", *m_rules.clip_norm)
                : std::string("its report names a clip the attempt did not ask for");
  } else if (auto short_dp = check_dp_report(m.dp, m_rules.required_dp, dp)) {
    refusal = std::move(short_dp);
  } else {
    refusal = m_server.add_masked(index, body, std::endian::little);
  }
  if (refusal) {
    drop(site, *refusal);
    return refusal;
  }
  m_inputs.push_back({{"site", site}, {"sha256", sha}, {"clipped", m.clipped}});
  if (m.sandbox) {
    m_inputs.back()["sandbox"] = sandbox_level_name(*m.sandbox);
  }
  if (m.model_policy) {
    m_inputs.back()["model_policy"] = model_policy_name(*m.model_policy);
  }
  if (m.clip_norm) {
    m_inputs.back()["clip_norm"] = *m.clip_norm;
  }
  if (dp) {
    m_dp.emplace(site, *dp);
  }
  return std::nullopt;
}

void
SecureRound::close_input(double now)
{
  if (m_stage == Stage::failed) {
    return;
  }
  if (m_stage != Stage::input) {
    fail(fmt::format("the attempt closed before every site's shares were relayed ({} stage)",
                     m_stage == Stage::keys ? "keys" : "shares"));
    return;
  }
  const auto& u3 = m_server.survivors();
  if (u3.size() < m_rules.quorum) {
    fail(fmt::format("{} masked inputs, below the {} the sum needs", u3.size(), m_rules.quorum));
    return;
  }
  begin_stage(Stage::agree, now);
  const SecAggUnmask request{m_task, m_server.unmask_request().survivors, {}};
  const auto header = request.to_header();
  for (const auto i : u3) {
    if (!out(i)) {
      m_host.secure_send(name_of(i), FrameType::secagg_unmask, header);
    }
  }
  advance(now);
}

void
SecureRound::signature(const std::string& site, const SecAggSignature& m, double now)
{
  const auto index = active(site);
  if (!index) {
    return;
  }
  if (m_stage != Stage::agree || m.signature.index != *index) {
    drop(site, "a signature of the survivors out of turn");
    return;
  }
  const auto payload = secagg::survivors_payload(m_p, m_server.unmask_request().survivors);
  if (!verify_signature(m_certs.at(site), payload, m.signature.signature)) {
    drop(site, "its signature of the survivors does not verify");
    return;
  }
  if (auto refusal = m_server.add_signature(m.signature)) {
    drop(site, *refusal);
    return;
  }
  advance(now);
}

void
SecureRound::reveal(const std::string& site, const SecAggReveal& m, double now)
{
  const auto index = active(site);
  if (!index) {
    return;
  }
  if (m_stage != Stage::unmask || m.reveal.index != *index || m_server.signers().count(*index) == 0) {
    drop(site, "shares revealed out of turn");
    return;
  }
  if (auto refusal = m_server.add_reveal(m.reveal)) {
    drop(site, *refusal);
    return;
  }
  advance(now);
}

void
SecureRound::gone(const std::string& site, const std::string& why, double now)
{
  if (is_participant(site)) {
    drop(site, why);
    advance(now);
  }
}

void
SecureRound::tick(double now)
{
  advance(now);
}

void
SecureRound::begin_stage(Stage s, double now)
{
  m_stage = s;
  m_deadline = now + m_rules.stage_timeout;
}

void
SecureRound::advance(double now)
{
  if (m_stage == Stage::input || m_stage == Stage::done || m_stage == Stage::failed) {
    return;
  }
  bool waiting = false;
  for (std::uint32_t i = 1; i <= m_p.sites.size(); ++i) {
    waiting = waiting || waiting_for(i);
  }
  if (waiting && now < m_deadline) {
    return;
  }
  // Whoever this stage still waits for is out.
  for (std::uint32_t i = 1; i <= m_p.sites.size(); ++i) {
    if (waiting_for(i)) {
      drop(name_of(i), "no answer by the stage's deadline");
    }
  }
  const std::size_t t = m_p.threshold;
  switch (m_stage) {
  case Stage::keys: {
    const auto& u1 = m_server.advertised();
    if (u1.size() < t) {
      fail(fmt::format("{} sites sent keys, below the threshold {}", u1.size(), t));
      return;
    }
    begin_stage(Stage::shares, now);
    for (const auto i : u1) {
      SecAggPeers peers{m_task, {}};
      for (auto& a : m_server.adverts_for(i)) {
        const auto& cert = m_certs.at(name_of(a.index));
        peers.peers.push_back({std::move(a), to_pem(cert)});
      }
      m_host.secure_send(name_of(i), FrameType::secagg_peers, peers.to_header());
    }
    break;
  }
  case Stage::shares: {
    const auto& u2 = m_server.shared();
    if (u2.size() < std::max(t, m_rules.quorum)) {
      fail(fmt::format("{} sites sent shares, below the {} needed", u2.size(), std::max(t, m_rules.quorum)));
      return;
    }
    begin_stage(Stage::input, now);
    for (const auto i : u2) {
      if (!out(i)) {
        m_host.secure_send(name_of(i), FrameType::secagg_shares,
                           SecAggShares{m_task, m_server.shares_for(i)}.to_header());
      }
    }
    break;
  }
  case Stage::agree: {
    const auto& signers = m_server.signers();
    const auto need = secagg::consistency_quorum(m_p);
    if (signers.size() < need) {
      fail(fmt::format("{} survivors signed the survivor list, below the {} needed", signers.size(), need));
      return;
    }
    begin_stage(Stage::unmask, now);
    const SecAggUnmask request{m_task, m_server.unmask_request().survivors, m_server.signatures()};
    const auto header = request.to_header();
    // With the signers' certificates: a site knows its neighbours' alone, and checks a majority.
    std::vector<std::pair<std::uint32_t, std::string>> certs;
    for (const auto i : signers) {
      certs.emplace_back(i, to_pem(m_certs.at(name_of(i))));
    }
    const auto body = std::make_shared<const std::string>(secagg_certificates_body(certs));
    for (const auto i : signers) {
      if (!out(i)) {
        m_host.secure_send(name_of(i), FrameType::secagg_unmask, header, body);
      }
    }
    break;
  }
  case Stage::unmask:
    try {
      m_sum = m_server.unmasked_sum();
      m_stage = Stage::done;
    } catch (const Error& e) {
      fail(fmt::format("the masks could not be removed: {}", e.what()));
    }
    return;
  default:
    return;
  }
  advance(now); // the next stage may have nobody to wait for
}

json
SecureRound::record() const
{
  json survivors = json::array();
  json after = json::array();
  for (const auto i : m_server.survivors()) {
    survivors.push_back(name_of(i));
    if (m_server.revealed().count(i) == 0) {
      after.push_back(name_of(i));
    }
  }
  json unmasked_by = json::array();
  for (const auto i : m_server.revealed()) {
    unmasked_by.push_back(name_of(i));
  }
  json dropped = json::array();
  for (const auto& [site, why] : m_dropped) {
    dropped.push_back({{"site", site}, {"reason", why}});
  }
  return {{"threshold", m_p.threshold},
          {"neighbours", m_p.neighbours},
          {"range", m_e.range},
          {"max_samples", m_e.max_samples},
          {"sites", m_p.sites},
          {"masked_inputs", m_inputs},
          {"survivors", survivors},
          {"unmasked_by", unmasked_by},
          {"dropped_after_masking", after},
          {"dropped", dropped}};
}

} // namespace fedl::core
