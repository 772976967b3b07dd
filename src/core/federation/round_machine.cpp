// SPDX-License-Identifier: Apache-2.0
#include "core/federation/round_machine.hpp"

#include "core/math/metrics.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <openssl/rand.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>

namespace fedl::core {

namespace {

using json = nlohmann::json;

// SplitMix64 (Steele, Lea, Flood 2014) to derive a per-attempt seed from (seed, round, attempt).
std::uint64_t
mix(std::uint64_t x)
{
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// 64 bits from the OS's CSPRNG (OpenSSL's RAND_bytes, seeded by getrandom(2)).
std::uint64_t
secret_seed()
{
  std::uint64_t seed = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&seed), sizeof seed) != 1) {
    throw Error("no random bytes from the operating system to draw a round's participants");
  }
  return seed;
}

constexpr double finish_linger = 3;       // seconds to let DONE frames reach the sites
constexpr std::size_t recent_rounds = 10; // kept for status()

} // namespace

RoundMachine::RoundMachine(const ServeSettings& settings, RoundHost& host, Clock clock)
  : m_s(settings), m_host(host), m_now(std::move(clock))
{
}

void
RoundMachine::resume(std::uint64_t next_round, FederationPrivacy privacy, std::optional<double> accuracy)
{
  m_round = next_round;
  m_privacy = std::move(privacy);
  m_stats.accuracy = accuracy;
}

void
RoundMachine::begin()
{
  m_waiting_since = m_now();
}

double
RoundMachine::projected_epsilon(double q) const
{
  auto next = m_privacy.client();
  next.add(q, m_s.privacy.noise_multiplier, 1);
  return next.epsilon(m_s.privacy.delta, m_s.privacy.accountant).epsilon;
}

std::vector<std::string>
RoundMachine::participants() const
{
  std::vector<std::string> names;
  for (const auto& [name, part] : m_participants) {
    names.push_back(name);
  }
  return names;
}

json
RoundMachine::status() const
{
  static constexpr std::array<const char*, 5> phases = {"waiting", "running", "aggregating", "finishing", "stopped"};
  json j = {{"state", phases.at(static_cast<std::size_t>(m_phase))},
            {"round", std::min<std::uint64_t>(m_round, m_s.rounds)},
            {"rounds", m_s.rounds},
            {"attempt", m_attempt},
            {"quorum", m_s.min_clients},
            {"deadline_seconds", m_phase == Phase::running ? json(std::max(0.0, m_deadline - m_now())) : json(nullptr)},
            {"accuracy", m_stats.accuracy ? json(*m_stats.accuracy) : json(nullptr)},
            {"recent", json::array()},
            {"participants", json::array()},
            {"benched", std::vector<std::string>(m_benched.begin(), m_benched.end())}};
  if (m_phase == Phase::finishing || m_phase == Phase::stopped) {
    j["round"] = m_round - 1;
  }
  for (const auto& r : m_recent) {
    j["recent"].push_back(r);
  }
  // The client-level epsilon the last round recorded (this process's rounds only: the ledger has
  // the earlier ones).
  const auto last_epsilon =
    std::find_if(m_recent.rbegin(), m_recent.rend(), [](const json& r) { return !r["epsilon"].is_null(); });
  j["epsilon"] = last_epsilon == m_recent.rend() ? json(nullptr) : (*last_epsilon)["epsilon"];
  for (const auto& [name, part] : m_participants) {
    json p = {{"site", name}};
    switch (part.state) {
    case Participant::State::pending:
      p["state"] = part.disconnected_at ? "disconnected" : "training";
      break;
    case Participant::State::received:
      p["state"] = "reported";
      break;
    case Participant::State::dropped:
      p["state"] = "dropped";
      p["why"] = part.note;
      break;
    }
    j["participants"].push_back(std::move(p));
  }
  return j;
}

void
RoundMachine::site_joined(const std::string& site)
{
  m_connected.insert(site);
  if (m_benched.erase(site) > 0) {
    m_site_failures.erase(site);
    FEDL_LOG_INFO("site {} connected anew: rounds may ask it again", site);
  }
  // A site that reconnects during a round it was asked to train gets its task again.
  if (m_phase == Phase::running) {
    if (const auto it = m_participants.find(site);
        it != m_participants.end() && it->second.state == Participant::State::pending) {
      it->second.disconnected_at.reset();
      send_task(site);
    }
  }
  if (m_phase == Phase::finishing) {
    m_host.send_done(site);
  }
  maybe_start();
}

void
RoundMachine::site_left(const std::string& site, const std::string& reason)
{
  m_connected.erase(site);
  if (m_phase == Phase::finishing || m_phase == Phase::stopped) {
    return;
  }
  FEDL_LOG_WARN("site {} disconnected: {} ({} connected)", site, reason, m_connected.size());
  if (m_phase == Phase::running) {
    if (const auto it = m_participants.find(site);
        it != m_participants.end() && it->second.state == Participant::State::pending) {
      // Not dropped at once: a site that comes back within the grace gets its task again (a
      // network blip must not cost it the round, or the round its quorum).
      it->second.disconnected_at = m_now();
      it->second.note = "disconnected: " + reason;
    }
  }
}

void
RoundMachine::site_removed(const std::string& site, const std::string& why)
{
  m_connected.erase(site);
  if (const auto it = m_participants.find(site);
      it != m_participants.end() && it->second.state == Participant::State::pending) {
    it->second.state = Participant::State::dropped;
    it->second.note = why;
  }
}

void
RoundMachine::site_error(const std::string& site, std::uint64_t task, const std::string& message)
{
  const auto it = m_participants.find(site);
  if (it == m_participants.end() || it->second.state != Participant::State::pending || task != m_task) {
    return;
  }
  it->second.state = Participant::State::dropped;
  it->second.note = message;
  const auto failures = ++m_site_failures[site];
  if (m_s.max_site_failures > 0 && failures >= m_s.max_site_failures && m_benched.insert(site).second) {
    FEDL_LOG_WARN_FIELDS(json({{"event", "site-benched"}, {"round", m_round}, {"site", site}, {"failures", failures}}),
                         "round {}: site {} failed {} in a row (the last: {}); it sits out the rest of this run "
                         "unless it connects anew (--max-site-failures)",
                         m_round, site, count_of(failures, "task"), message);
    m_benched_now.push_back({{"site", site}, {"failures", failures}, {"reason", message}});
    const auto enrolled = std::max(m_enrolled, m_connected.size());
    const auto left = enrolled - std::min(enrolled, m_benched.size());
    if (left < m_s.min_clients) {
      m_host.fail(fmt::format("{} of the {} failed {} in a row each ({}), which leaves {} for rounds that need "
                              "--min-clients {}: fix the sites (their logs say why) and start again",
                              m_benched.size(), count_of(enrolled, "site"), count_of(m_s.max_site_failures, "task"),
                              fmt::join(m_benched, ", "), left, m_s.min_clients));
      return;
    }
  }
  check_complete();
}

std::vector<std::string>
RoundMachine::eligible_sites() const
{
  std::vector<std::string> out;
  std::copy_if(m_connected.begin(), m_connected.end(), std::back_inserter(out),
               [&](const auto& s) { return m_benched.count(s) == 0; });
  return out;
}

std::optional<UploadRefusal>
RoundMachine::check_upload(const std::string& site, std::uint64_t task, std::uint64_t round) const
{
  if (m_answered.count({site, task}) > 0) {
    // Not late: its first answer to this task was received (and is being, or was, aggregated).
    return UploadRefusal{"the site already sent one for this task", false};
  }
  if (m_phase != Phase::running || task != m_task) {
    const auto issued = m_issued.find(task);
    const bool late = issued != m_issued.end() && issued->second == round;
    return UploadRefusal{late               ? fmt::format("it came after the deadline of round {}", round)
                         : round != m_round ? fmt::format("it is for round {}, not {}", round, m_round)
                                            : std::string("it answers no task of this round"),
                         late};
  }
  const auto it = m_participants.find(site);
  if (it == m_participants.end()) {
    return UploadRefusal{"the site was not asked for one this round", false};
  }
  if (it->second.state == Participant::State::received) {
    return UploadRefusal{"the site already sent one this round", false};
  }
  if (it->second.state == Participant::State::dropped) {
    return UploadRefusal{fmt::format("the site was dropped from this round ({})", it->second.note), false};
  }
  return std::nullopt;
}

void
RoundMachine::refuse_upload(const std::string& site, std::uint64_t task, std::uint64_t round,
                            const UploadRefusal& refusal)
{
  FEDL_LOG_WARN("update from {} dropped: {}", site, refusal.why);
  ++m_stats.rejected[refusal.late ? "late" : "unexpected"];
  // One record per site and task in the ledger.
  if (refusal.late && m_late_recorded.insert({site, task}).second) {
    m_late.push_back({{"site", site}, {"round", round}, {"reason", refusal.why}});
  }
}

void
RoundMachine::upload_lost(const std::string& site, const std::string& why)
{
  if (const auto it = m_participants.find(site); it != m_participants.end()) {
    it->second.state = Participant::State::dropped;
    it->second.note = why;
  }
  check_complete();
}

void
RoundMachine::upload_received(const std::string& site, const std::filesystem::path& file, json metrics,
                              std::optional<UpdateDigest> digest)
{
  const auto it = m_participants.find(site);
  if (m_phase != Phase::running || it == m_participants.end() || it->second.state != Participant::State::pending) {
    return; // check_upload took it, and the attempt closed while it arrived
  }
  it->second.state = Participant::State::received;
  m_site_failures.erase(site);
  it->second.file = file;
  it->second.digest = std::move(digest);
  it->second.metrics = std::move(metrics);
  m_answered.insert({site, m_task});
  check_complete();
}

void
RoundMachine::tick()
{
  if (m_phase == Phase::running && m_now() >= m_deadline) {
    FEDL_LOG_WARN("round {}: deadline of {} s reached", m_round, m_s.round_timeout);
    close("deadline");
  }
  if (m_phase == Phase::waiting) {
    maybe_start();
  }
}

void
RoundMachine::maybe_start()
{
  if (m_phase != Phase::waiting) {
    return;
  }
  const double now = m_now();
  if (now < m_not_before) {
    return;
  }
  if (eligible() < m_s.min_clients) {
    m_quorum_since.reset();
    if (m_s.wait_timeout > 0 && now - m_waiting_since > m_s.wait_timeout) {
      m_host.fail(fmt::format(
        "only {} of the {} sites that round {} needs connected within --wait-timeout {} s{}", eligible(),
        m_s.min_clients, m_round, m_s.wait_timeout,
        m_benched.empty() ? ""
                          : fmt::format(" ({} more sit out: --max-site-failures)", m_connected.size() - eligible())));
    }
    return;
  }
  if (!m_quorum_since) {
    m_quorum_since = now;
  }
  // Give sites that are connecting at the same moment a chance to be in this round (not those
  // benched, connected or not).
  const auto absent_benched = static_cast<std::size_t>(
    std::count_if(m_benched.begin(), m_benched.end(), [&](const auto& s) { return m_connected.count(s) == 0; }));
  if (m_connected.size() + absent_benched < m_enrolled && now - *m_quorum_since < m_s.settle) {
    return;
  }
  start();
}

void
RoundMachine::start()
{
  m_host.refresh_trust();
  if (eligible() < m_s.min_clients) {
    return;
  }
  const auto& privacy = m_s.privacy;
  const auto eligible_names = eligible_sites();
  std::vector<std::string> names;
  for (const auto& name : eligible_names) {
    if (m_excluded.count(name) == 0) {
      names.push_back(name);
    }
  }
  if (names.size() < m_s.min_clients) {
    FEDL_LOG_WARN("round {}: {} sites were excluded from this round, which would leave fewer than --min-clients {}; "
                  "asking them again",
                  m_round, m_excluded.size(), m_s.min_clients);
    m_excluded.clear();
    names = eligible_names;
  }
  const std::size_t connected = names.size();
  std::size_t asked = connected;
  if (m_s.clients_per_round > 0) {
    asked = std::min<std::size_t>(m_s.clients_per_round, connected);
  } else if (m_s.fraction > 0) {
    asked = static_cast<std::size_t>(std::ceil(m_s.fraction * static_cast<double>(connected)));
  }
  asked = std::clamp<std::size_t>(asked, std::min<std::size_t>(m_s.min_clients, connected), connected);
  m_client_dp.reset();
  if (privacy.noise_multiplier > 0) {
    // A secret selection puts each site in the round with probability asked / connected (the rate
    // the accountant composes; a site not connected is in no round); a seeded one is public.
    const double q = m_s.seeded_selection ? 1.0 : static_cast<double>(asked) / static_cast<double>(connected);
    if (privacy.max_epsilon > 0) {
      const double next = projected_epsilon(q);
      if (next > privacy.max_epsilon) {
        FEDL_LOG_WARN("round {} would take the federation's epsilon to {:.4g} (delta {:g}), past --max-epsilon {:g}: "
                      "stopping",
                      m_round, next, privacy.delta, privacy.max_epsilon);
        finish("privacy-budget", {{"epsilon", m_privacy.client().epsilon(privacy.delta, privacy.accountant).epsilon},
                                  {"next_round_epsilon", next},
                                  {"max_epsilon", privacy.max_epsilon},
                                  {"delta", privacy.delta}});
        return;
      }
    }
    m_client_dp = ClientDpRound{privacy.clip_norm, privacy.noise_multiplier, q, privacy.delta,
                                asked == connected ? "all" : (m_s.seeded_selection ? "seeded" : "secret")};
  }
  ++m_attempt;
  m_host.attempt_started();
  m_task = m_task_rng() | 1;
  m_issued[m_task] = m_round;
  // Seeded: the same seed, round, attempt and connected sites choose the same participants.
  // Otherwise a fresh 64-bit seed from the OS's CSPRNG per attempt: the sites see who is asked in
  // each round, never anything that predicts the next.
  std::mt19937_64 rng(m_s.seeded_selection ? mix(m_s.seed ^ mix(m_round ^ mix(m_attempt))) : secret_seed());
  std::shuffle(names.begin(), names.end(), rng);
  names.resize(asked);
  std::sort(names.begin(), names.end());
  m_participants.clear();
  for (const auto& name : names) {
    m_participants[name] = Participant{};
  }
  m_phase = Phase::running;
  m_round_started = m_now();
  m_deadline = m_round_started + m_s.round_timeout;
  FEDL_LOG_INFO_FIELDS(json({{"event", "round-start"},
                             {"round", m_round},
                             {"attempt", m_attempt},
                             {"asked", asked},
                             {"connected", connected},
                             {"sites", names}}),
                       "round {}/{}{}: training on {} of {} sites: {}", m_round, m_s.rounds,
                       m_attempt > 1 ? fmt::format(" (attempt {})", m_attempt) : "", asked, connected,
                       fmt::join(names, ", "));
  for (const auto& name : names) {
    send_task(name);
  }
}

void
RoundMachine::send_task(const std::string& site)
{
  m_host.send_task(site,
                   RoundTask{m_round, m_attempt, m_task, std::max(0.0, m_deadline - m_now()), m_s.seed + m_round});
}

void
RoundMachine::check_complete()
{
  if (m_phase != Phase::running) {
    return;
  }
  const double now = m_now();
  bool pending = false;
  for (auto& [name, part] : m_participants) {
    if (part.state == Participant::State::pending && part.disconnected_at &&
        now - *part.disconnected_at >= reconnect_grace()) {
      FEDL_LOG_WARN("round {}: {} did not come back within {:.0f} s; going on without it", m_round, name,
                    reconnect_grace());
      part.state = Participant::State::dropped;
    }
    pending = pending || part.state == Participant::State::pending;
  }
  if (!pending) {
    close("every site answered");
  }
}

void
RoundMachine::close(const std::string& why)
{
  AttemptClose a;
  a.round = m_round;
  a.client_dp = m_client_dp;
  a.asked = static_cast<std::uint32_t>(m_participants.size());
  json late = std::exchange(m_late, json::array());
  json dropped = json::array();
  json site_metrics = json::object();
  for (auto& [name, part] : m_participants) {
    switch (part.state) {
    case Participant::State::received:
      a.candidates.push_back({part.file, name, true, part.digest});
      site_metrics[name] = part.metrics;
      break;
    case Participant::State::pending:
      late.push_back({{"site", name}, {"round", m_round}, {"reason", "no update by the deadline"}});
      ++m_stats.rejected["late"];
      if (m_connected.count(name) > 0) {
        m_host.discard_upload(name);
      }
      break;
    case Participant::State::dropped:
      dropped.push_back({{"site", name}, {"reason", part.note}});
      break;
    }
  }
  FEDL_LOG_DEBUG("round {}: closing the attempt ({}), {} updates", m_round, why, a.candidates.size());
  m_phase = Phase::aggregating;
  a.extra = {{"attempt", m_attempt}, {"asked", m_participants.size()}, {"late", late},
             {"dropped", dropped},   {"site_metrics", site_metrics},   {"seconds", m_now() - m_round_started}};
  if (!m_benched_now.empty()) {
    a.extra["benched"] = std::exchange(m_benched_now, json::array());
  }
  // The sites' evaluations of the model they were sent (join --eval-data): that of the round
  // before, pooled.
  if (auto pooled = pool_site_evaluations(site_metrics, m_s.max_num_samples); !pooled.is_null()) {
    pooled["model_round"] = m_round - 1;
    a.extra["federated_evaluation"] = std::move(pooled);
  }
  m_host.close_attempt(std::move(a));
}

void
RoundMachine::attempt_retry(const std::string& why)
{
  ++m_stats.retries;
  // Back off before the next attempt (1, 2, 4 ... 30 s): a cause that persists (bad settings at
  // every site, a site that always fails) must not spin attempts and ledger entries.
  const double delay = std::min(30.0, std::pow(2.0, std::min<double>(m_failed_in_a_row++, 5)));
  FEDL_LOG_WARN("round {} attempt {} is not counted: {}; it will be run again in {:.0f} s", m_round, m_attempt, why,
                delay);
  m_phase = Phase::waiting;
  m_waiting_since = m_now() + delay;
  m_not_before = m_waiting_since;
  m_quorum_since.reset();
  if (m_stop_requested) {
    m_host.stop();
    return;
  }
  maybe_start();
}

void
RoundMachine::attempt_committed(const json& body)
{
  const double seconds = m_now() - m_round_started;
  m_stats.last_round_seconds = seconds;
  m_stats.round_seconds_sum += seconds;
  ++m_stats.rounds_done;
  m_stats.updates_accepted += body.at("participants").size();
  m_stats.rejected["invalid"] += body.at("rejected").size();
  std::string text;
  json fields = {{"event", "round-done"},
                 {"round", m_round},
                 {"rounds", m_s.rounds},
                 {"updates", body.at("participants").size()},
                 {"rejected", body.at("rejected").size()},
                 {"seconds", seconds}};
  if (body.contains("evaluation") && body["evaluation"].contains("accuracy")) {
    m_stats.accuracy = body["evaluation"]["accuracy"].get<double>();
    text = fmt::format(", accuracy {:.2f}%", *m_stats.accuracy * 100);
    fields["accuracy"] = *m_stats.accuracy;
    fields["loss"] = body["evaluation"].value("loss", json(nullptr));
  }
  m_privacy.replay(body, /*verify=*/false);
  text += round_privacy_text(body);
  if (const auto epsilon = round_client_epsilon(body)) {
    fields["epsilon"] = *epsilon;
  }
  m_recent.push_back({{"round", m_round},
                      {"accuracy", fields.value("accuracy", json(nullptr))},
                      {"loss", fields.value("loss", json(nullptr))},
                      {"epsilon", fields.value("epsilon", json(nullptr))},
                      {"seconds", seconds},
                      {"updates", fields["updates"]}});
  if (m_recent.size() > recent_rounds) {
    m_recent.pop_front();
  }
  FEDL_LOG_INFO_FIELDS(fields, "round {}/{} done: {}{}{}, {:.2f} s", m_round, m_s.rounds,
                       count_of(body.at("participants").size(), "update"),
                       body.at("rejected").empty() ? "" : fmt::format(" ({} rejected)", body.at("rejected").size()),
                       text, seconds);
  ++m_round;
  m_attempt = 0;
  m_failed_in_a_row = 0;
  m_late_recorded.clear();
  m_excluded.clear();
  m_participants.clear();
  std::erase_if(m_issued, [this](const auto& task) { return task.second + 1 < m_round; });
  std::erase_if(m_answered, [this](const auto& answer) { return m_issued.count(answer.second) == 0; });
  if (m_round > m_s.rounds) {
    finish("rounds");
    return;
  }
  if (m_s.target_accuracy && m_stats.accuracy && *m_stats.accuracy >= *m_s.target_accuracy) {
    finish("target-accuracy");
    return;
  }
  if (m_stop_requested) {
    m_host.stop();
    return;
  }
  m_phase = Phase::waiting;
  m_waiting_since = m_now();
  m_quorum_since.reset();
  maybe_start();
}

void
RoundMachine::attempt_failed()
{
  m_phase = Phase::waiting;
}

bool
RoundMachine::request_stop()
{
  m_stop_requested = true;
  return m_phase != Phase::aggregating;
}

void
RoundMachine::finish(const std::string& reason, json details)
{
  m_reason = reason;
  m_phase = Phase::finishing;
  FEDL_LOG_INFO("federation finished after round {} ({}); telling {} sites", m_round - 1,
                reason == "rounds"           ? "all rounds done"
                : reason == "privacy-budget" ? "privacy budget spent"
                                             : "target accuracy reached",
                m_connected.size());
  details["round"] = m_round - 1;
  details["reason"] = reason;
  m_host.finish(std::move(details));
  m_finish_at = m_now() + finish_linger;
}

} // namespace fedl::core
