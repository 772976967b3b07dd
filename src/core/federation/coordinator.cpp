// SPDX-License-Identifier: Apache-2.0
#include "core/federation/coordinator_detail.hpp"

#include "core/federation/round.hpp"
#include "core/federation/round_machine.hpp"
#include "core/net/connection.hpp"
#include "core/net/metrics_server.hpp"
#include "core/net/peer_pool.hpp"
#include "core/net/site_protocol.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/server_trust.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <fcntl.h>
#include <map>
#include <set>
#include <sys/resource.h>
#include <thread>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core {

namespace serve_detail {

RoundSettings
attempt_settings(const ServeSettings& s, const Evaluator& evaluate, const AttemptClose& a)
{
  RoundSettings settings{s.strategy, s.server, evaluate, a.extra, a.client_dp, std::nullopt};
  settings.best_metric = s.best_metric;
  if (a.client_dp) {
    settings.options.client_dp =
      ServerOptions::ClientDp{a.client_dp->noise_multiplier * a.client_dp->clip_norm, double(a.asked), 0};
    settings.options.clip_norm = a.client_dp->clip_norm;
  }
  if (s.privacy.max_epsilon > 0) {
    settings.max_epsilon = s.privacy.max_epsilon;
  }
  settings.accountant = s.privacy.accountant;
  return settings;
}

void
Coordinator::load_tls()
{
  m_tls = TlsContext::server(m_trust->identity(), m_trust->ca(), m_trust->crl() ? &m_trust->crl() : nullptr);
}

// Picks up `fedl init WS --add-client` and `--revoke` run while the coordinator serves: new
// connections see the new CRL at their handshake, and revoked sites already connected are dropped.
void
Coordinator::refresh_trust()
{
  if (!m_trust->refresh()) {
    return;
  }
  load_tls();
  for (const auto& [name, p] : std::map(m_sites)) {
    const bool revoked = m_trust->revoked(p->cert);
    if (revoked || !m_trust->enrolled(name)) {
      // Out of the federation now: not counted for a quorum, not waited for in this round.
      m_sites.erase(name);
      p->admitted = false;
      p->removed = true;
      discard_part(*p);
      m_rounds.site_removed(name, revoked ? "revoked" : "no longer a client");
      p->conn->send_error_and_close(
        fmt::format("site {} {}", name, revoked ? "has been revoked" : "is no longer a client of this federation"), 3);
    }
  }
}

void
Coordinator::send_task(const std::string& site, const RoundTask& task)
{
  Task frame{task.round,  task.attempt, task.task, task.deadline, task.seed, to_json(m_s.training),
             m_model_sha, m_head,       json()};
  if (m_s.secure_aggregation) {
    const auto* secure = secure_round_for(task);
    if (secure == nullptr || !secure->is_participant(site)) {
      return; // no plain task where the federation promised secure aggregation
    }
    frame.secure_aggregation = secure->setup_for(site).to_json();
  }
  m_sites.at(site)->conn->send(FrameType::task, frame.to_header(), {m_model->bytes()}, m_model);
}

void
Coordinator::send_done(const std::string& site)
{
  m_sites.at(site)->conn->send(FrameType::done, Done{m_rounds.round() - 1, m_rounds.reason(), m_head}.to_header());
}

void
Coordinator::discard_upload(const std::string& site)
{
  if (const auto it = m_sites.find(site); it != m_sites.end()) {
    discard_part(*it->second);
  }
}

void
Coordinator::close_attempt(AttemptClose attempt)
{
  if (m_s.secure_aggregation) {
    if (!m_secure || m_secure->task() != m_rounds.task()) {
      SecureSum none;
      none.failure = "no secure aggregation could be set up for this attempt";
      commit_on_round_thread([this, attempt = std::move(attempt), none = std::move(none)] {
        return commit_secure_attempt(m_ws, attempt.round, none, attempt_settings(m_s, m_evaluate, attempt), &m_ledger);
      });
      return;
    }
    // The inputs are in: the survivors are named, sign, and reveal; check_secure commits.
    m_secure_close = std::move(attempt);
    m_secure->close_input(FramedConnection::now());
    check_secure();
    return;
  }
  commit_on_round_thread([this, attempt = std::move(attempt)] {
    return commit_attempt(m_ws, attempt.round, attempt.candidates, m_s.min_clients,
                          attempt_settings(m_s, m_evaluate, attempt), &m_ledger);
  });
}

void
Coordinator::commit_on_round_thread(std::function<AttemptOutcome()> commit)
{
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  m_round_thread = std::thread([this, commit = std::move(commit)] {
    AttemptOutcome outcome;
    std::string failure;
    try {
      outcome = commit();
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "an unknown error";
    }
    asio::post(m_io,
               [this, outcome = std::move(outcome), failure]() mutable { attempt_done(std::move(outcome), failure); });
  });
}

void
Coordinator::attempt_done(AttemptOutcome outcome, const std::string& failure)
{
  clean_incoming(true);
  if (m_secure && !outcome.retry.empty()) {
    // A site accused of sending shares that did not open sits out the rest of this round.
    for (const auto& site : m_secure->accused()) {
      m_rounds.exclude(site);
    }
  }
  m_secure.reset();
  if (failure.empty() && outcome.retry.empty()) {
    try {
      const auto& model = outcome.committed.at("model");
      m_model = std::make_shared<MappedFile>(m_ws.root() / model.at("file").get<std::string>());
      m_model_sha = model.at("sha256").get<std::string>();
    } catch (const std::exception& e) {
      m_rounds.attempt_failed();
      fail(e.what());
      return;
    }
    m_rounds.attempt_committed(outcome.committed);
  } else if (!outcome.retry.empty()) {
    m_rounds.attempt_retry(outcome.retry);
  } else {
    // The round thread is done: stop now.
    m_rounds.attempt_failed();
    const auto message = fmt::format("round {} could not be completed: {}", m_rounds.round(), failure);
    FEDL_LOG_ERROR("{}; stopping (the round is run again when fedl serve starts)", message);
    fail(message);
  }
}

void
Coordinator::finish(json details)
{
  try {
    const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
    append_signed(m_ws, "finished", details);
  } catch (const Error& e) {
    FEDL_LOG_WARN("could not record the end in the ledger: {}", e.what());
  }
  update_head();
  for (const auto& [name, p] : m_sites) {
    send_done(name);
  }
}

// The first SIGINT/SIGTERM lets a round being written finish; a second one stops at once (the
// round is then run again on the next start, as after a crash).
void
Coordinator::wait_for_signal()
{
  m_signals.async_wait([this](const std::error_code& ec, int sig) {
    if (ec) {
      return;
    }
    const char* what = sig == SIGINT ? "interrupted" : "terminated";
    if (m_rounds.stop_requested()) {
      FEDL_LOG_WARN("{} again: stopping now", what);
      stop_now();
      return;
    }
    const bool now = m_rounds.request_stop();
    FEDL_LOG_WARN("{}: stopping{}", what, now ? "" : " once this round is written (again to stop now)");
    if (now) {
      stop_now();
    } else {
      wait_for_signal();
    }
  });
}

void
Coordinator::stop_now()
{
  m_rounds.stopped();
  if (m_pool) {
    m_pool->close(FramedConnection::now());
  }
  if (m_metrics) {
    m_metrics->close();
  }
  m_tick.cancel();
  m_signals.cancel();
  m_io.stop();
}

void
Coordinator::fail(const std::string& message)
{
  if (m_failure.empty()) {
    m_failure = message;
  }
  if (m_rounds.request_stop()) {
    stop_now(); // else once the round thread is done
  }
}

void
Coordinator::update_head()
{
  try {
    m_head = signed_head(m_trust->identity(), ledger_head(m_ws.ledger()), certificate_fingerprint(m_trust->ca()));
  } catch (const Error& e) {
    FEDL_LOG_WARN("cannot sign the ledger head for the sites' receipts: {}", e.what());
  }
}

void
Coordinator::clean_incoming(bool keep_slots)
{
  std::set<fs::path> keep(m_free_slots.begin(), m_free_slots.end());
  if (m_pool) {
    for (const auto& [id, pooled] : m_pool->peers()) {
      if (const auto& p = static_cast<const Peer&>(*pooled); p.fd) {
        keep.insert(p.part); // being received
      }
    }
  }
  const auto dir = m_ws.state() / "incoming";
  std::error_code ec;
  std::vector<fs::path> others;
  for (const auto& f : fs::directory_iterator(dir, ec)) {
    if (keep.count(f.path()) == 0) {
      others.push_back(f.path());
    }
  }
  // The attempt's update files (round-NNNNNN-SITE.safetensors, no longer mapped: its commit is
  // over) become slots: as many as the attempt took, so no more disk than its commit needed.
  for (const auto& path : others) {
    const auto name = path.filename().string();
    if (keep_slots && name.rfind("round-", 0) == 0 && name.size() > 12 &&
        name.compare(name.size() - 12, 12, ".safetensors") == 0 && fs::is_regular_file(fs::symlink_status(path, ec))) {
      auto slot = dir / fmt::format("slot-{}", m_slots_named++);
      fs::rename(path, slot, ec);
      if (!ec) {
        m_free_slots.push_back(std::move(slot));
        continue;
      }
    }
    fs::remove(path, ec);
  }
}

void
Coordinator::on_tick()
{
  const double now = FramedConnection::now();
  if (now - m_trust_checked >= 1) {
    m_trust_checked = now;
    refresh_trust();
    m_rounds.check_complete();
  }
  m_pool->tick(now);
  if (m_secure) {
    m_secure->tick(now);
    check_secure();
  }
  m_rounds.tick();
  refresh_status(now);
  if (m_rounds.phase() == Phase::finishing) {
    bool drained = true;
    for (const auto& [name, p] : m_sites) {
      drained = drained && p->conn->queued() == 0;
    }
    if (drained || now >= m_rounds.finish_at()) {
      stop_now();
      return;
    }
  }
  if (m_rounds.phase() == Phase::stopped) {
    return;
  }
  m_tick.expires_after(std::chrono::milliseconds(m_rounds.phase() == Phase::finishing ? 20 : 100));
  m_tick.async_wait([this](const std::error_code& ec) {
    if (!ec) {
      on_tick();
    }
  });
}

json
Coordinator::summary(const std::string& reason) const
{
  const auto& st = m_rounds.stats();
  json j = {{"rounds_completed", m_rounds.round() - 1},
            {"rounds_run", st.rounds_done},
            // The round this run started at; none for a federation that was already complete.
            {"first_round", reason == "already-complete" ? json(nullptr) : json(m_first_round)},
            {"reason", reason},
            {"interrupted", reason == "interrupted"},
            {"retries", st.retries},
            {"model", Workspace::model_name(m_rounds.round() - 1)},
            {"model_sha256", m_model_sha},
            {"seconds", FramedConnection::now() - m_started}};
  j["accuracy"] = st.accuracy ? json(*st.accuracy) : json(nullptr);
  return j;
}

// Where the ledger left the federation: the round, the model, the privacy spent. A restart must
// not quietly weaken what the rounds so far promised: no client-level DP, less noise, a larger
// clip, or a budget dropped or raised.
void
Coordinator::resume(const LedgerState& state)
{
  m_first_round = state.model.round + 1;
  check_not_weaker(state.client_dp, m_s.privacy, m_first_round - 1);
  if (const auto last = state.privacy.accountant(); last && *last != m_s.privacy.accountant) {
    FEDL_LOG_WARN("the rounds up to {} computed epsilon with {}; from round {} on it is {} (--accountant, fedl.json), "
                  "over every round so far, and the ledger records the change",
                  m_first_round - 1, accountant_name(*last), m_first_round, accountant_name(m_s.privacy.accountant));
  }
  if (state.secure_round > 0) {
    check_secure_not_weaker(state.secure_settings, m_s.secure_aggregation, state.secure_round);
  }
  m_model = std::make_shared<MappedFile>(m_ws.root() / state.model.file);
  m_model_sha = state.model.sha256;
  if (sha256_hex(m_model->bytes()) != m_model_sha) {
    throw VerifyError("{} does not match the ledger: it was replaced or altered; run fedl audit {}",
                      (m_ws.root() / state.model.file).string(), m_ws.root().string());
  }
  m_rounds.resume(m_first_round, state.privacy, state.accuracy);
  // A crash between a round's entry and its link leaves models/best.safetensors behind the ledger.
  if (state.best) {
    relink_best_model(m_ws, state.best->round);
  }
}

// With a budget: stops (exit 4) if not even the smallest round fits in what is left, recording
// that once in the ledger (`recorded`: it ends with that record already).
void
Coordinator::check_budget_left(bool recorded)
{
  const auto& p = m_s.privacy;
  if (p.max_epsilon <= 0) {
    return;
  }
  // The smallest sampling rate a round can have: the quorum out of every enrolled site.
  const auto enrolled = std::max<std::size_t>(m_trust->clients().size(), 1);
  const double q =
    m_s.seeded_selection ? 1.0 : std::min(1.0, std::max<double>(m_s.min_clients, 1) / static_cast<double>(enrolled));
  const auto& privacy = m_rounds.privacy();
  const double spent = privacy.client().epsilon(p.delta, p.accountant).epsilon;
  const double next = m_rounds.projected_epsilon(q);
  if (next > p.max_epsilon) {
    if (!recorded) {
      const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
      append_signed(m_ws, "finished",
                    {{"round", m_first_round - 1},
                     {"reason", "privacy-budget"},
                     {"epsilon", spent},
                     {"next_round_epsilon", next},
                     {"max_epsilon", p.max_epsilon},
                     {"delta", p.delta}});
    }
    throw Error(ExitCode::budget,
                "the federation's privacy budget allows no further round: epsilon {:.4g} after {} rounds with "
                "client-level DP, and one more round (at the lowest sampling rate, {:.3g}) would make it {:.4g}, past "
                "--max-epsilon {:g} at delta {:g}",
                spent, privacy.client_rounds(), q, next, p.max_epsilon, p.delta);
  }
  FEDL_LOG_INFO("privacy: epsilon {:.4g} of {:g} spent at delta {:g} ({} rounds with client-level DP)", spent,
                p.max_epsilon, p.delta, privacy.client_rounds());
}

json
Coordinator::run()
{
  m_started = FramedConnection::now();
  m_started_utc = utc_now();
  bool budget_stop_recorded = false;
  {
    // One entry at a time: a coordinator that resumes a long federation must not hold the parsed
    // ledger (some 10 bytes per byte of it) for its whole run.
    m_ledger = LedgerState::read(m_ws);
    resume(m_ledger);
    budget_stop_recorded = m_ledger.ends_with_budget_stop;
  }
  const auto& accuracy = m_rounds.stats().accuracy;
  if (m_first_round > m_s.rounds || (m_s.target_accuracy && accuracy && *accuracy >= *m_s.target_accuracy)) {
    FEDL_LOG_INFO("the federation is already complete ({} rounds in the ledger); nothing to do", m_first_round - 1);
    return summary("already-complete");
  }
  m_trust.emplace(m_ws);
  check_budget_left(budget_stop_recorded);
  m_max_update = m_model->bytes().size() + update_slack;
  // Each site holds a socket (and an update file while it uploads): take every descriptor the
  // hard limit allows rather than the soft default of 1024.
  if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
  }
  fs::create_directories(m_ws.state() / "incoming");
  clean_incoming(false);
  load_tls();
  m_rounds.set_enrolled(m_trust->clients().size());
  listen_on(m_acceptor, m_s.listen, "--listen");
  PoolLimits limits;
  limits.heartbeat = m_s.heartbeat;
  limits.dead_after = m_s.dead_after;
  m_pool.emplace(m_acceptor, limits, [this](tcp::socket socket) { return make_peer(std::move(socket)); });
  if (m_s.metrics) {
    m_metrics.emplace(m_io, *m_s.metrics, [this] { return metrics_text(); });
  }
  {
    const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
    json settings = m_s.to_json();
    settings["resume_round"] = m_first_round;
    append_signed(m_ws, "serve", settings);
  }
  FEDL_LOG_INFO("serving {} on {}: round {} of {}, {} known sites, quorum {}", m_ws.root().string(),
                m_s.listen.to_string(), m_first_round, m_s.rounds, m_trust->clients().size(), m_s.min_clients);
  if (m_metrics) {
    FEDL_LOG_INFO("metrics at http://{}/metrics", m_s.metrics->to_string());
    m_metrics->start();
  }
  wait_for_signal();
  m_rounds.begin();
  m_pool->start();
  on_tick();
  m_io.run();
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  m_free_slots.clear(); // nothing is left for a next round
  clean_incoming(false);
  const auto reason = m_rounds.stop_requested() ? std::string("interrupted") : m_rounds.reason();
  write_status(m_rounds.status(),
               m_failure.empty()
                 ? json{{"state", reason == "interrupted" ? "interrupted" : "finished"}, {"reason", reason}}
                 : json{{"state", "failed"}, {"error", m_failure}});
  if (!m_failure.empty()) {
    throw Error("{}", m_failure);
  }
  return summary(reason);
}

} // namespace serve_detail

nlohmann::json
run_coordinator(const Workspace& ws, const ServeSettings& settings, const Evaluator& evaluate)
{
  // A peer that resets its connection while OpenSSL writes to it (with write(2)) must be a send
  // error on that connection, not the death of this process by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  serve_detail::Coordinator c(ws, settings, evaluate);
  return c.run();
}

} // namespace fedl::core
