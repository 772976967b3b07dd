// SPDX-License-Identifier: Apache-2.0
#include "core/federation/coordinator.hpp"

#include "core/federation/ledger_state.hpp"
#include "core/federation/round.hpp"
#include "core/federation/round_machine.hpp"
#include "core/net/connection.hpp"
#include "core/net/metrics_server.hpp"
#include "core/net/site_protocol.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/server_trust.hpp"
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
#include <sys/resource.h>
#include <thread>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using tcp = asio::ip::tcp;
using json = nlohmann::json;

constexpr double close_linger = 10; // seconds a closing peer has to take its error message
// Connections still in the handshake or before HELLO: anyone can open them, so they are bounded
// per source address (a new one past the bound is closed at once) and in all (the oldest is
// closed to make room, so that a flood from many addresses cannot keep a site from its turn),
// and each has a short deadline. An enrolled site needs one such connection for a few ms.
constexpr std::size_t max_unadmitted = 256;
constexpr std::size_t max_unadmitted_per_address = 8;
constexpr double admit_timeout = 5;             // seconds from accept to HELLO
constexpr std::size_t max_error_text = 500;     // bytes of a site's error report kept
constexpr std::size_t max_metrics = 32;         // entries of a site's metrics kept
constexpr std::uint32_t refusal_burst = 20;     // refused connections logged one by one per window
constexpr double refusal_window = 10;           // seconds
constexpr int max_unexpected_updates = 3;       // per connection, before it is closed
constexpr std::uint64_t update_slack = 4 << 20; // metadata, certificate and signature beyond the tensors

// One TCP connection, before and after the site is admitted.
struct Peer
{
  std::uint64_t id = 0;
  std::shared_ptr<FramedConnection> conn;
  std::string address;     // the source IP address
  std::string site;        // certificate CN, once the handshake is done
  std::string fingerprint; // certificate SHA-256
  Cert cert;
  bool admitted = false;
  bool replaced = false; // a newer connection of the same site took over
  bool removed = false;  // revoked or removed from fedl.json while connected
  int unexpected = 0;    // updates it sent that answered no task
  double accepted_at = 0;
  // The update being received, if any.
  int fd = -1;
  fs::path part;
};

// A site's metrics as the log and the ledger keep them: at most max_metrics entries of a number,
// a boolean or a short string under a short name; anything else the site sent is left out.
json
bounded_metrics(const json& metrics)
{
  json out = json::object();
  if (!metrics.is_object()) {
    return out;
  }
  for (const auto& [key, value] : metrics.items()) {
    if (out.size() >= max_metrics) {
      break;
    }
    if (key.size() > 64) {
      continue;
    }
    if (value.is_number() || value.is_boolean()) {
      out[key] = value;
    } else if (value.is_string()) {
      out[key] = valid_utf8(value.get<std::string>(), 200);
    }
  }
  return out;
}

// What the round thread makes of a closed attempt: the committed round's ledger body, or why the
// attempt does not count (too few valid updates; recorded as "round-failed").
struct AttemptOutcome
{
  json committed;
  std::string retry;
};

// Validates the attempt's updates and commits the round if a quorum of them is valid, as
// `fedl aggregate --workspace` would; throws Error for what stops the coordinator.
AttemptOutcome
commit_attempt(const Workspace& ws, const ServeSettings& s, const Evaluator& evaluate, const AttemptClose& a)
{
  const WorkspaceLock lock(ws, WorkspaceLock::Kind::change, 30);
  const auto plan = plan_workspace_round(ws);
  if (plan.round != a.round) {
    throw Error("the ledger is at round {} where this coordinator expected {}: another process wrote a round; "
                "restart fedl serve",
                plan.round, a.round);
  }
  const auto validated = validate_round(plan, a.candidates, OnBadUpdate::skip);
  AttemptOutcome out;
  if (validated.accepted.size() < s.min_clients) {
    out.retry = fmt::format("{} valid updates of {} asked, below the quorum of {}", validated.accepted.size(),
                            a.extra["asked"].get<std::size_t>(), s.min_clients);
    json body = a.extra;
    body["round"] = a.round;
    body["reason"] = out.retry;
    body["rejected"] = validated.rejected;
    append_signed(ws, "round-failed", body);
    return out;
  }
  RoundSettings settings{s.strategy, s.server, evaluate, a.extra, a.client_dp, std::nullopt};
  if (a.client_dp) {
    settings.options.client_dp =
      ServerOptions::ClientDp{a.client_dp->noise_multiplier * a.client_dp->clip_norm, double(a.asked), 0};
    settings.options.clip_norm = a.client_dp->clip_norm;
  }
  if (s.privacy.max_epsilon > 0) {
    settings.max_epsilon = s.privacy.max_epsilon;
  }
  out.committed = commit_round(validated, settings).ledger_body;
  return out;
}

using Phase = RoundMachine::Phase;

// The sockets, threads and files around the round state machine.
class Coordinator final : public RoundHost
{
public:
  Coordinator(const Workspace& ws, const ServeSettings& s, const Evaluator& evaluate)
    : m_ws(ws),
      m_s(s),
      m_evaluate(evaluate),
      m_rounds(s, *this, &FramedConnection::now),
      m_acceptor(m_io),
      m_tick(m_io),
      m_accept_pause(m_io),
      m_signals(m_io, SIGINT, SIGTERM)
  {
  }

  ~Coordinator() override
  {
    if (m_round_thread.joinable()) {
      m_round_thread.join();
    }
  }

  json run();

private:
  // RoundHost.
  void refresh_trust() override;
  void attempt_started() override { update_head(); }
  void send_task(const std::string& site, const RoundTask& task) override;
  void send_done(const std::string& site) override;
  void discard_upload(const std::string& site) override;
  void close_attempt(AttemptClose attempt) override;
  void finish(const std::string& reason, json details) override;
  void fail(const std::string& message) override;
  void stop() override { stop_now(); }

  // Setup.
  void resume();
  void check_budget_left();
  void load_tls();
  void accept();
  void on_tick();

  // Connections.
  void on_ready(const std::shared_ptr<Peer>& p);
  FramedConnection::BodySink on_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header);
  void on_frame(const std::shared_ptr<Peer>& p, FrameType type, json& header);
  void on_close(const std::shared_ptr<Peer>& p, const std::string& reason);
  void on_hello(const std::shared_ptr<Peer>& p, const json& header);
  void on_update(const std::shared_ptr<Peer>& p, const json& header);
  void discard_part(Peer& p);

  void attempt_done(AttemptOutcome outcome, const std::string& failure);
  void stop_now();
  void wait_for_signal();
  std::string metrics_text() const;
  void clean_incoming();
  // Logs a refused connection, or counts it once refusal_burst were logged in this window, so
  // that a flood of strangers cannot flood the log; flush_refusals() says how many were not.
  void log_refusal(const std::string& text);
  // Called on every tick and before stopping (final = true), so that no count goes unsaid.
  void flush_refusals(double now, bool final = false);
  // Signs the ledger's current head into m_head (keeps the previous one if it cannot be read).
  void update_head();
  json summary(const std::string& reason) const;

  const Workspace& m_ws;
  const ServeSettings& m_s;
  const Evaluator& m_evaluate;
  RoundMachine m_rounds;

  asio::io_context m_io;
  tcp::acceptor m_acceptor;
  std::optional<MetricsServer> m_metrics;
  asio::steady_timer m_tick;
  asio::steady_timer m_accept_pause;
  asio::signal_set m_signals;
  std::thread m_round_thread;

  // Trust: reloaded when fedl.json or the CRL change on disk (init --add-client, --revoke).
  std::optional<ServerTrust> m_trust;
  std::shared_ptr<TlsContext> m_tls;
  double m_trust_checked = 0; // last look at fedl.json and the CRL

  std::uint64_t m_next_id = 1;
  std::map<std::uint64_t, std::shared_ptr<Peer>> m_peers;
  std::map<std::string, std::shared_ptr<Peer>> m_sites; // admitted, by site name

  std::shared_ptr<MappedFile> m_model;
  std::string m_model_sha;
  json m_head; // the ledger head, signed, that tasks and done frames carry
  std::uint64_t m_max_update = 0;

  // Outcome and metrics.
  std::uint64_t m_first_round = 0;
  bool m_budget_stop_recorded = false; // the ledger ends with a "finished" entry for the budget
  std::string m_failure;
  std::uint64_t m_bytes_in_closed = 0;
  std::uint64_t m_bytes_out_closed = 0;
  std::uint64_t m_refused = 0;           // connections refused at the handshake or hello
  double m_refusal_window = 0;           // when the current window of refusal logs began
  std::uint32_t m_refusals_logged = 0;   // ... and how many were logged in it
  std::uint64_t m_refusals_unlogged = 0; // ... and how many were only counted
  double m_started = 0;
};

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
Coordinator::accept()
{
  m_acceptor.async_accept([this](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && m_rounds.phase() != Phase::stopped) {
        // Out of descriptors (EMFILE) or memory: retrying at once would spin; pause a little.
        FEDL_LOG_WARN("accept failed: {} (if it says too many open files, raise the limit: ulimit -n)", ec.message());
        m_accept_pause.expires_after(std::chrono::milliseconds(200));
        m_accept_pause.async_wait([this](const std::error_code& e) {
          if (!e) {
            accept();
          }
        });
      }
      return;
    }
    // Connections that have not said hello yet cost a descriptor and a TLS state each, and
    // anyone can open them (see max_unadmitted).
    std::error_code ep_error;
    const auto address = socket.remote_endpoint(ep_error).address().to_string();
    std::size_t unadmitted = 0;
    std::size_t from_address = 0;
    std::shared_ptr<Peer> oldest;
    for (const auto& [id, peer] : m_peers) {
      if (!peer->admitted && peer->conn->is_open()) {
        ++unadmitted;
        from_address += peer->address == address ? 1 : 0;
        oldest = oldest ? oldest : peer;
      }
    }
    if (from_address >= max_unadmitted_per_address) {
      ++m_refused;
      std::error_code ignored;
      socket.close(ignored);
      FEDL_LOG_DEBUG("refused a connection from {}: {} of its connections have not said hello yet", address,
                     from_address);
      accept();
      return;
    }
    if (unadmitted >= max_unadmitted && oldest) {
      FEDL_LOG_DEBUG("closing the oldest of {} connections that have not said hello yet", unadmitted);
      oldest->conn->close("too many connections waiting for hello");
    }
    refresh_trust();
    auto p = std::make_shared<Peer>();
    p->id = m_next_id++;
    p->address = address;
    p->accepted_at = FramedConnection::now();
    std::weak_ptr<Peer> weak = p;
    FrameLimits limits;
    limits.allow(FrameType::hello)
      .allow(FrameType::heartbeat)
      .allow(FrameType::error)
      .allow(FrameType::update, m_max_update);
    FramedConnection::Callbacks cb;
    cb.on_ready = [this, weak] {
      if (auto peer = weak.lock()) {
        on_ready(peer);
      }
    };
    cb.on_head = [this, weak](const FramePrefix& prefix, const json& header) {
      auto peer = weak.lock();
      return peer ? on_head(peer, prefix, header) : FramedConnection::BodySink{};
    };
    cb.on_frame = [this, weak](FrameType type, json& header, const FramedConnection::BodySink&) {
      if (auto peer = weak.lock()) {
        on_frame(peer, type, header);
      }
    };
    cb.on_close = [this, weak](const std::string& reason) {
      if (auto peer = weak.lock()) {
        on_close(peer, reason);
      }
    };
    try {
      p->conn = std::make_shared<FramedConnection>(std::make_unique<TlsStream>(std::move(socket), m_tls), limits, cb);
      m_peers[p->id] = p;
      p->conn->start();
    } catch (const Error& e) {
      FEDL_LOG_WARN("dropping a connection: {}", e.what());
    }
    if (m_rounds.phase() != Phase::stopped) {
      accept();
    }
  });
}

void
Coordinator::on_ready(const std::shared_ptr<Peer>& p)
{
  p->cert = p->conn->stream().peer_certificate();
  if (!p->cert) {
    p->conn->close("no client certificate");
    return;
  }
  CertificateInfo info;
  try {
    info = certificate_info(p->cert);
  } catch (const Error& e) {
    p->conn->send_error_and_close(fmt::format("the client certificate cannot be read: {}", e.what()), 3);
    return;
  }
  p->site = info.common_name;
  p->fingerprint = info.fingerprint;
  if (!m_trust->enrolled(p->site)) {
    ++m_refused;
    p->conn->send_error_and_close(
      fmt::format("site {} is not a client of this federation (add it with fedl init WS --add-client {})", p->site,
                  p->site),
      3);
  }
}

FramedConnection::BodySink
Coordinator::on_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header)
{
  if (prefix.type != FrameType::update || !p->admitted) {
    p->conn->send_error_and_close(fmt::format("protocol error: a {} frame with a body{}", frame_type_name(prefix.type),
                                              p->admitted ? "" : " before hello"),
                                  1);
    return {};
  }
  const auto update = Update::from_header(header);
  const auto task = update.task;
  const auto round = update.round;
  if (const auto refusal = m_rounds.check_upload(p->site, task, round)) {
    // Bounded: a site that keeps sending updates nobody asked for is disconnected rather than
    // allowed to fill the log.
    if (++p->unexpected > max_unexpected_updates) {
      p->conn->send_error_and_close("protocol error: too many updates that answer no task", 1);
      return {};
    }
    m_rounds.refuse_upload(p->site, task, round, *refusal);
    return {};
  }
  p->part = m_ws.state() / "incoming" / fmt::format("round-{:06}-{}.part", m_rounds.round(), p->site);
  p->fd = ::open(p->part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (p->fd < 0) {
    // The coordinator's problem (descriptors, disk), not the site's: this update is lost and the
    // site recorded as dropped; the round goes on with the others.
    FEDL_LOG_ERROR("cannot store the update of {} in {}: {}", p->site, p->part.string(), std::strerror(errno));
    m_rounds.upload_lost(p->site, fmt::format("the coordinator could not store its update: {}", std::strerror(errno)));
    return {};
  }
  return {nullptr, p->fd};
}

void
Coordinator::discard_part(Peer& p)
{
  if (p.fd >= 0) {
    // The connection may still be receiving this body: it must stop writing to the descriptor
    // before the number can be reused by the next open() or accept().
    p.conn->drop_body();
    ::close(p.fd);
    p.fd = -1;
    std::error_code ec;
    fs::remove(p.part, ec);
  }
}

void
Coordinator::on_frame(const std::shared_ptr<Peer>& p, FrameType type, json& header)
{
  switch (type) {
  case FrameType::hello:
    on_hello(p, header);
    return;
  case FrameType::update:
    on_update(p, header);
    return;
  case FrameType::heartbeat:
    return;
  case FrameType::error: {
    // A site's words go into the log and the ledger: cut to a sane length.
    const auto report = ErrorReport::from_header(header);
    const auto message = valid_utf8(report.message, max_error_text);
    FEDL_LOG_WARN("site {} reports: {}", p->site, message);
    m_rounds.site_error(p->site, report.task.value_or(0), message);
    return;
  }
  default:
    p->conn->send_error_and_close(fmt::format("protocol error: unexpected {} frame", frame_type_name(type)), 1);
  }
}

void
Coordinator::on_hello(const std::shared_ptr<Peer>& p, const json& header)
{
  if (p->admitted) {
    p->conn->send_error_and_close("protocol error: hello sent twice", 1);
    return;
  }
  if (p->site.empty() || !p->conn->is_open()) {
    return;
  }
  const auto claimed = Hello::from_header(header).site;
  if (claimed != p->site) {
    p->conn->send_error_and_close(
      fmt::format("hello names site {} but the certificate is for {}", quote_text(claimed), p->site), 3);
    return;
  }
  if (const auto old = m_sites.find(p->site); old != m_sites.end()) {
    FEDL_LOG_INFO("site {} connected again from {}; closing its older connection", p->site, p->conn->stream().remote());
    auto previous = old->second;
    m_sites.erase(old);
    previous->admitted = false;
    previous->replaced = true;
    discard_part(*previous);
    previous->conn->send_error_and_close("replaced by a newer connection of the same site", 1, {{"replaced", true}});
  }
  p->admitted = true;
  m_sites[p->site] = p;
  FEDL_LOG_INFO("site {} connected from {} ({} connected)", p->site, p->conn->stream().remote(), m_sites.size());
  // With what the ledger says this site spent: a site with a budget counts the larger of this and
  // its own account, and refuses to go on if its account is missing or shorter.
  const Welcome welcome{m_rounds.round(), m_s.rounds, m_s.heartbeat, certificate_fingerprint(m_trust->ca()),
                        m_rounds.privacy().site_report(p->site)};
  p->conn->send(FrameType::welcome, welcome.to_header());
  // The machine sends its task again to a participant that reconnects mid-round.
  m_rounds.site_joined(p->site);
}

void
Coordinator::on_update(const std::shared_ptr<Peer>& p, const json& header)
{
  if (p->fd < 0) {
    return; // dropped in on_head, already logged
  }
  ::close(p->fd);
  p->fd = -1;
  const auto file = p->part.parent_path() / fmt::format("round-{:06}-{}.safetensors", m_rounds.round(), p->site);
  std::error_code ec;
  fs::rename(p->part, file, ec);
  if (ec) {
    fail(fmt::format("cannot store an update as {}: {}", file.string(), ec.message()));
    return;
  }
  FEDL_LOG_DEBUG("round {}: update from {} ({} bytes)", m_rounds.round(), p->site, fs::file_size(file, ec));
  m_rounds.upload_received(p->site, file, bounded_metrics(Update::from_header(header).metrics));
}

void
Coordinator::on_close(const std::shared_ptr<Peer>& p, const std::string& reason)
{
  m_bytes_in_closed += p->conn->bytes_in();
  m_bytes_out_closed += p->conn->bytes_out();
  discard_part(*p);
  m_peers.erase(p->id);
  if (!p->conn->ready() || (!p->admitted && p->site.empty())) {
    ++m_refused;
    log_refusal(fmt::format("refused a connection from {}: {}", p->conn->stream().remote(), reason));
    return;
  }
  if (!p->admitted) {
    if (m_rounds.phase() != Phase::stopped && !p->replaced && !p->removed) {
      FEDL_LOG_WARN("connection from {} ({}) closed before it was admitted: {}", p->conn->stream().remote(), p->site,
                    reason);
    }
    return;
  }
  p->admitted = false;
  const auto it = m_sites.find(p->site);
  if (it == m_sites.end() || it->second != p) {
    return;
  }
  m_sites.erase(it);
  m_rounds.site_left(p->site, reason);
}

void
Coordinator::send_task(const std::string& site, const RoundTask& task)
{
  const Task frame{task.round, task.attempt,          task.task,   task.deadline,
                   task.seed,  to_json(m_s.training), m_model_sha, m_head};
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
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  m_round_thread = std::thread([this, attempt = std::move(attempt)] {
    AttemptOutcome outcome;
    std::string failure;
    try {
      outcome = commit_attempt(m_ws, m_s, m_evaluate, attempt);
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
  clean_incoming();
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
Coordinator::finish(const std::string& /*reason: in details*/, json details)
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
  flush_refusals(FramedConnection::now(), true);
  std::error_code ec;
  m_acceptor.close(ec);
  if (m_metrics) {
    m_metrics->close();
  }
  m_tick.cancel();
  m_signals.cancel();
  for (const auto& [id, p] : std::map(m_peers)) {
    p->conn->close("the coordinator is stopping");
  }
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
Coordinator::log_refusal(const std::string& text)
{
  flush_refusals(FramedConnection::now());
  if (m_refusals_logged < refusal_burst) {
    ++m_refusals_logged;
    FEDL_LOG_WARN("{}", text);
  } else {
    ++m_refusals_unlogged;
  }
}

void
Coordinator::flush_refusals(double now, bool final)
{
  if (!final && now - m_refusal_window < refusal_window) {
    return;
  }
  if (m_refusals_unlogged > 0) {
    FEDL_LOG_WARN("refused {} more connections in the last {:.0f} s without logging each (strangers that do not "
                  "complete TLS with a site certificate, or do not say hello)",
                  m_refusals_unlogged, now - m_refusal_window);
  }
  m_refusal_window = now;
  m_refusals_logged = 0;
  m_refusals_unlogged = 0;
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
Coordinator::clean_incoming()
{
  std::error_code ec;
  for (const auto& f : fs::directory_iterator(m_ws.state() / "incoming", ec)) {
    bool in_use = false;
    for (const auto& [id, p] : m_peers) {
      in_use = in_use || (p->fd >= 0 && p->part == f.path());
    }
    if (!in_use) {
      fs::remove(f.path(), ec);
    }
  }
}

void
Coordinator::on_tick()
{
  const double now = FramedConnection::now();
  flush_refusals(now);
  if (now - m_trust_checked >= 1) {
    m_trust_checked = now;
    refresh_trust();
    m_rounds.check_complete();
  }
  for (const auto& [id, p] : std::map(m_peers)) {
    auto& c = *p->conn;
    if (!c.is_open()) {
      continue;
    }
    if (c.closing_since() > 0 && now - c.closing_since() > close_linger) {
      c.close("it did not take its error message in time");
    } else if (!p->admitted && now - p->accepted_at > admit_timeout) {
      c.close(fmt::format("no hello within {} s", admit_timeout));
    } else if (c.ready() && now - c.last_received() > m_s.dead_after) {
      c.close(fmt::format("nothing received for {:.0f} s", now - c.last_received()));
    } else if (c.ready() && c.queued() == 0 && now - c.last_sent() >= m_s.heartbeat) {
      c.send(FrameType::heartbeat, json::object());
    }
  }
  m_rounds.tick();
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

std::string
Coordinator::metrics_text() const
{
  std::uint64_t in = m_bytes_in_closed;
  std::uint64_t out = m_bytes_out_closed;
  for (const auto& [id, p] : m_peers) {
    in += p->conn->bytes_in();
    out += p->conn->bytes_out();
  }
  const auto& st = m_rounds.stats();
  std::string t;
  const auto metric = [&](const char* name, const char* type, const char* help, const std::string& samples) {
    t += fmt::format("# HELP {} {}\n# TYPE {} {}\n{}", name, help, name, type, samples);
  };
  metric("fedl_round", "gauge", "The round being run (or next to run).",
         fmt::format("fedl_round {}\n", m_rounds.round()));
  metric("fedl_rounds_completed_total", "counter", "Rounds completed by this coordinator process.",
         fmt::format("fedl_rounds_completed_total {}\n", st.rounds_done));
  metric("fedl_rounds_retried_total", "counter", "Round attempts that missed the quorum and were run again.",
         fmt::format("fedl_rounds_retried_total {}\n", st.retries));
  metric("fedl_connected_sites", "gauge", "Sites connected and admitted.",
         fmt::format("fedl_connected_sites {}\n", m_sites.size()));
  metric("fedl_round_duration_seconds", "summary", "Duration of completed rounds, from tasks sent to ledger entry.",
         fmt::format("fedl_round_duration_seconds_sum {}\nfedl_round_duration_seconds_count {}\n", st.round_seconds_sum,
                     st.rounds_done));
  metric("fedl_last_round_duration_seconds", "gauge", "Duration of the last completed round.",
         fmt::format("fedl_last_round_duration_seconds {}\n", st.last_round_seconds));
  metric("fedl_received_bytes_total", "counter", "Bytes received from sites (TLS payload).",
         fmt::format("fedl_received_bytes_total {}\n", in));
  metric("fedl_sent_bytes_total", "counter", "Bytes sent to sites (TLS payload).",
         fmt::format("fedl_sent_bytes_total {}\n", out));
  metric("fedl_updates_accepted_total", "counter", "Updates aggregated.",
         fmt::format("fedl_updates_accepted_total {}\n", st.updates_accepted));
  std::string rejected;
  for (const char* reason : {"invalid", "late", "unexpected"}) {
    const auto it = st.rejected.find(reason);
    rejected += fmt::format("fedl_updates_rejected_total{{reason=\"{}\"}} {}\n", reason,
                            it == st.rejected.end() ? 0 : it->second);
  }
  metric("fedl_updates_rejected_total", "counter", "Updates left out, by reason.", rejected);
  metric("fedl_connections_refused_total", "counter", "Connections refused at the TLS handshake or at hello.",
         fmt::format("fedl_connections_refused_total {}\n", m_refused));
  if (st.accuracy) {
    metric("fedl_accuracy", "gauge", "Test accuracy of the latest global model.",
           fmt::format("fedl_accuracy {}\n", *st.accuracy));
  }
  return t;
}

json
Coordinator::summary(const std::string& reason) const
{
  const auto& st = m_rounds.stats();
  json j = {{"rounds_completed", m_rounds.round() - 1},
            {"rounds_run", st.rounds_done},
            {"first_round", m_first_round},
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
Coordinator::resume()
{
  // One entry at a time: a coordinator that resumes a long federation must not hold the parsed
  // ledger (some 10 bytes per byte of it) for its whole run.
  auto state = LedgerState::read(m_ws);
  m_first_round = state.model.round + 1;
  if (const auto& last_dp = state.client_dp; !last_dp.is_null()) {
    const auto& c = last_dp["client"];
    const auto& p = m_s.privacy;
    const double noise = c.value("noise_multiplier", 0.0);
    const double clip = c.value("clip_norm", 0.0);
    const bool weaker =
      p.noise_multiplier < noise || p.clip_norm > clip ||
      (last_dp.contains("max_epsilon") && (p.max_epsilon <= 0 || p.max_epsilon > last_dp.value("max_epsilon", 0.0)));
    if (weaker) {
      throw UsageError("rounds up to {} ran with client-level DP (clip {:g}, noise multiplier {:g}{}); serve them on "
                       "with at least that (--dp-clip-norm, --dp-noise-multiplier{}), not clip {:g}, noise multiplier "
                       "{:g}{}",
                       m_first_round - 1, clip, noise,
                       last_dp.contains("max_epsilon") ? fmt::format(", budget {:g}", last_dp.value("max_epsilon", 0.0))
                                                       : std::string(),
                       last_dp.contains("max_epsilon") ? ", --max-epsilon" : "", p.clip_norm, p.noise_multiplier,
                       p.max_epsilon > 0 ? fmt::format(", budget {:g}", p.max_epsilon) : std::string(", no budget"));
    }
  }
  m_model = std::make_shared<MappedFile>(m_ws.root() / state.model.file);
  m_model_sha = state.model.sha256;
  if (sha256_hex(m_model->bytes()) != m_model_sha) {
    throw VerifyError("{} does not match the ledger: it was replaced or altered; run fedl audit {}",
                      (m_ws.root() / state.model.file).string(), m_ws.root().string());
  }
  m_rounds.resume(m_first_round, std::move(state.privacy), state.accuracy);
  m_budget_stop_recorded = state.last_kind == "finished" && state.finished.value("reason", "") == "privacy-budget";
}

// With a budget: stops (exit 4) if not even the smallest round fits in what is left, recording
// that once in the ledger.
void
Coordinator::check_budget_left()
{
  const auto& p = m_s.privacy;
  if (p.max_epsilon <= 0) {
    return;
  }
  // The smallest sampling rate a round can have: the quorum out of every enrolled site.
  const auto enrolled = std::max<std::size_t>(load_config(m_ws.config()).clients.size(), 1);
  const double q = std::min(1.0, std::max<double>(m_s.min_clients, 1) / static_cast<double>(enrolled));
  const auto& privacy = m_rounds.privacy();
  const double spent = privacy.client().epsilon(p.delta).epsilon;
  const double next = m_rounds.projected_epsilon(q);
  if (next > p.max_epsilon) {
    if (!m_budget_stop_recorded) {
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
  resume();
  const auto& accuracy = m_rounds.stats().accuracy;
  if (m_first_round > m_s.rounds || (m_s.target_accuracy && accuracy && *accuracy >= *m_s.target_accuracy)) {
    FEDL_LOG_INFO("the federation is already complete ({} rounds in the ledger); nothing to do", m_first_round - 1);
    return summary("already-complete");
  }
  check_budget_left();
  m_max_update = m_model->bytes().size() + update_slack;
  // Each site holds a socket (and an update file while it uploads): take every descriptor the
  // hard limit allows rather than the soft default of 1024.
  if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
  }
  fs::create_directories(m_ws.state() / "incoming");
  clean_incoming();
  m_trust.emplace(m_ws);
  load_tls();
  m_rounds.set_enrolled(m_trust->clients().size());
  listen_on(m_acceptor, m_s.listen, "--listen");
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
  accept();
  on_tick();
  m_io.run();
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  if (!m_failure.empty()) {
    throw Error("{}", m_failure);
  }
  return summary(m_rounds.stop_requested() ? "interrupted" : m_rounds.reason());
}

} // namespace

json
run_coordinator(const Workspace& ws, const ServeSettings& settings, const Evaluator& evaluate)
{
  // A peer that resets its connection while OpenSSL writes to it (with write(2)) must be a send
  // error on that connection, not the death of this process by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  Coordinator c(ws, settings, evaluate);
  return c.run();
}

} // namespace fedl::core
