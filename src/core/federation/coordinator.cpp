// SPDX-License-Identifier: Apache-2.0
#include "core/federation/coordinator.hpp"

#include "core/federation/round.hpp"
#include "core/net/connection.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/receipt.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <asio/write.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <fcntl.h>
#include <map>
#include <random>
#include <set>
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
constexpr double finish_linger = 3;             // seconds to let DONE frames reach the sites
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

enum class Phase
{
  waiting,
  running,
  aggregating,
  finishing,
  stopped
};

struct Participant
{
  enum class State
  {
    pending,
    received,
    dropped
  } state = State::pending;
  fs::path file;
  json metrics = json::object();
  std::string note;           // why it was dropped
  double disconnected_at = 0; // pending but disconnected since then (it may come back)
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

// SplitMix64 (Steele, Lea, Flood 2014) to derive a per-attempt seed from (seed, round, attempt).
std::uint64_t
mix(std::uint64_t x)
{
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

class Coordinator
{
public:
  Coordinator(const Workspace& ws, const ServeSettings& s, const Evaluator& evaluate)
    : m_ws(ws),
      m_s(s),
      m_evaluate(evaluate),
      m_acceptor(m_io),
      m_metrics_acceptor(m_io),
      m_tick(m_io),
      m_accept_pause(m_io),
      m_signals(m_io, SIGINT, SIGTERM)
  {
  }

  ~Coordinator()
  {
    if (m_round_thread.joinable()) {
      m_round_thread.join();
    }
  }

  json run();

private:
  // Setup.
  void load_trust(bool initial);
  void refresh_trust();
  void listen();
  void accept();
  void accept_metrics();
  void on_tick();

  // Connections.
  void on_ready(const std::shared_ptr<Peer>& p);
  FramedConnection::BodySink on_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header);
  void on_frame(const std::shared_ptr<Peer>& p, FrameType type, json& header);
  void on_close(const std::shared_ptr<Peer>& p, const std::string& reason);
  void on_hello(const std::shared_ptr<Peer>& p, const json& header);
  void on_update(const std::shared_ptr<Peer>& p, const json& header);
  void discard_part(Peer& p);

  // Rounds.
  void maybe_start_round();
  void start_round();
  void send_task(Peer& p);
  void check_round_complete();
  // How long a participant that disconnected mid-round may take to come back for its task.
  double reconnect_grace() const { return 2 * m_s.heartbeat; }
  void finish_attempt(const std::string& why);
  void round_done(json result);
  void round_failed(const std::string& why);
  void finish(const std::string& reason, json details = json::object());
  // With a budget: the epsilon after one more round at client sampling rate q.
  double projected_epsilon(double q) const;
  void stop_now();
  void wait_for_signal();
  void fail(const std::string& message);
  std::string metrics_text() const;
  void clean_incoming();
  // Logs a refused connection, or counts it once refusal_burst were logged in this window, so
  // that a flood of strangers cannot flood the log; flush_refusals() says how many were not.
  void log_refusal(const std::string& text);
  // Called on every tick and before stopping (final = true), so that no count goes unsaid.
  void flush_refusals(double now, bool final = false);
  // Signs the ledger's current head into m_head (keeps the previous one if it cannot be read).
  void update_head();

  const Workspace& m_ws;
  const ServeSettings& m_s;
  const Evaluator& m_evaluate;

  asio::io_context m_io;
  tcp::acceptor m_acceptor;
  tcp::acceptor m_metrics_acceptor;
  asio::steady_timer m_tick;
  asio::steady_timer m_accept_pause;
  asio::signal_set m_signals;
  std::thread m_round_thread;

  // Trust: reloaded when fedl.json or the CRL change on disk (init --add-client, --revoke).
  Identity m_identity;
  Cert m_ca;
  Crl m_crl;
  std::set<std::string> m_clients;
  std::shared_ptr<TlsContext> m_tls;
  fs::file_time_type m_crl_time;
  fs::file_time_type m_config_time;

  std::uint64_t m_next_id = 1;
  std::map<std::uint64_t, std::shared_ptr<Peer>> m_peers;
  std::map<std::string, std::shared_ptr<Peer>> m_sites; // admitted, by site name

  // Round state.
  Phase m_phase = Phase::waiting;
  std::uint64_t m_round = 1; // the round being run (or the next one)
  std::uint32_t m_attempt = 0;
  std::uint64_t m_task = 0; // random id of the current attempt's task
  // The tasks given in this round and the previous one (id -> round), which tell an update that
  // came too late from one that answers no task at all.
  std::map<std::uint64_t, std::uint64_t> m_issued;
  std::map<std::string, Participant> m_participants;
  double m_round_started = 0;
  double m_deadline = 0;
  double m_quorum_since = 0;
  double m_waiting_since = 0;
  double m_finish_at = 0;
  double m_not_before = 0;
  double m_trust_checked =
    0; // last look at fedl.json and the CRL        // no attempt starts before this (backoff after a failed one)
  std::uint32_t m_failed_in_a_row = 0;
  FederationPrivacy m_privacy;              // replayed from the ledger, advanced with each round
  std::optional<ClientDpRound> m_client_dp; // the current attempt's client-level DP
  std::uint32_t m_client_dp_asked = 0;      // the current attempt's denominator
  std::shared_ptr<MappedFile> m_model;
  std::string m_model_sha;
  json m_head; // the ledger head, signed, that tasks and done frames carry
  std::uint64_t m_max_update = 0;
  json m_late = json::array(); // updates that arrived too late, for the next attempt's ledger entry
  std::set<std::pair<std::string, std::uint64_t>> m_late_recorded; // (site, task) already in m_late
  std::set<std::pair<std::string, std::uint64_t>> m_answered;      // (site, task) whose update was received
  std::mt19937_64 m_task_rng{std::random_device{}()};

  // Outcome and metrics.
  std::uint64_t m_first_round = 0;
  std::uint64_t m_rounds_done = 0; // by this run
  std::optional<double> m_accuracy;
  std::string m_reason;
  std::string m_failure;
  bool m_interrupted = false;
  std::uint64_t m_retries = 0;
  std::uint64_t m_bytes_in_closed = 0;
  std::uint64_t m_bytes_out_closed = 0;
  std::uint64_t m_updates_accepted = 0;
  std::map<std::string, std::uint64_t> m_rejected; // by reason
  std::uint64_t m_refused = 0;                     // connections refused at the handshake or hello
  double m_refusal_window = 0;                     // when the current window of refusal logs began
  std::uint32_t m_refusals_logged = 0;             // ... and how many were logged in it
  std::uint64_t m_refusals_unlogged = 0;           // ... and how many were only counted
  double m_last_round_seconds = 0;
  double m_round_seconds_sum = 0;
  double m_started = 0;
};

void
Coordinator::load_trust(bool initial)
{
  if (initial) {
    m_identity = read_identity(m_ws.server_cert(), m_ws.server_key());
    m_ca = read_certificate(m_ws.ca_cert());
  }
  std::error_code ec;
  m_crl_time = fs::last_write_time(m_ws.crl(), ec);
  m_config_time = fs::last_write_time(m_ws.config(), ec);
  m_crl = fs::exists(m_ws.crl()) ? read_crl(m_ws.crl()) : Crl{};
  check_revocations(m_ws);
  const auto config = load_config(m_ws.config());
  m_clients = std::set<std::string>(config.clients.begin(), config.clients.end());
  m_tls = TlsContext::server(m_identity, m_ca, m_crl ? &m_crl : nullptr);
}

// Picks up `fedl init WS --add-client` and `--revoke` run while the coordinator serves: new
// connections see the new CRL at their handshake, and revoked sites already connected are dropped.
void
Coordinator::refresh_trust()
{
  std::error_code ec1, ec2;
  const auto crl_time = fs::last_write_time(m_ws.crl(), ec1);
  const auto config_time = fs::last_write_time(m_ws.config(), ec2);
  if ((ec1 || crl_time == m_crl_time) && (ec2 || config_time == m_config_time)) {
    return;
  }
  try {
    load_trust(false);
  } catch (const Error& e) {
    FEDL_LOG_WARN("keeping the previous certificates and client list: {}", e.what());
    return;
  }
  FEDL_LOG_INFO("reloaded the client list and CRL ({} clients)", m_clients.size());
  for (const auto& [name, p] : std::map(m_sites)) {
    const bool revoked = m_crl && is_revoked(m_crl, p->cert);
    if (revoked || m_clients.count(name) == 0) {
      // Out of the federation now: not counted for a quorum, not waited for in this round.
      m_sites.erase(name);
      p->admitted = false;
      p->removed = true;
      discard_part(*p);
      if (const auto it = m_participants.find(name);
          it != m_participants.end() && it->second.state == Participant::State::pending) {
        it->second.state = Participant::State::dropped;
        it->second.note = revoked ? "revoked" : "no longer a client";
      }
      p->conn->send_error_and_close(
        fmt::format("site {} {}", name, revoked ? "has been revoked" : "is no longer a client of this federation"), 3);
    }
  }
}

void
Coordinator::listen()
{
  const auto bind = [&](tcp::acceptor& acceptor, const HostPort& where, const char* what) {
    std::error_code ec;
    const auto address = asio::ip::make_address(where.host == "localhost" ? "127.0.0.1" : where.host, ec);
    if (ec) {
      throw UsageError("{} {}: {} is not an IP address to listen on (use 0.0.0.0 for all)", what, where.to_string(),
                       where.host);
    }
    const tcp::endpoint ep(address, where.port);
    acceptor.open(ep.protocol(), ec);
    if (!ec) {
      acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
      acceptor.bind(ep, ec);
    }
    if (!ec) {
      acceptor.listen(asio::socket_base::max_listen_connections, ec);
    }
    if (ec) {
      throw Error("cannot listen on {} ({}): {}", where.to_string(), what, ec.message());
    }
  };
  bind(m_acceptor, m_s.listen, "--listen");
  if (m_s.metrics) {
    bind(m_metrics_acceptor, *m_s.metrics, "--metrics");
  }
}

void
Coordinator::accept()
{
  m_acceptor.async_accept([this](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && m_phase != Phase::stopped) {
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
    if (m_phase != Phase::stopped) {
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
  if (m_clients.count(p->site) == 0) {
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
  const auto task = header_uint(header, "task");
  const auto round = header_uint(header, "round");
  const auto it = m_participants.find(p->site);
  std::string why;
  bool late = false;
  if (m_answered.count({p->site, task}) > 0) {
    // Not late: its first answer to this task was received (and is being, or was, aggregated).
    why = "the site already sent one for this task";
  } else if (m_phase != Phase::running || task != m_task) {
    const auto issued = m_issued.find(task);
    late = issued != m_issued.end() && issued->second == round;
    why = late               ? fmt::format("it came after the deadline of round {}", round)
          : round != m_round ? fmt::format("it is for round {}, not {}", round, m_round)
                             : std::string("it answers no task of this round");
  } else if (it == m_participants.end()) {
    why = "the site was not asked for one this round";
  } else if (it->second.state == Participant::State::received) {
    why = "the site already sent one this round";
  } else if (it->second.state == Participant::State::dropped) {
    why = fmt::format("the site was dropped from this round ({})", it->second.note);
  }
  if (!why.empty()) {
    // Bounded: one record per site and task in the ledger, and a site that keeps sending updates
    // nobody asked for is disconnected rather than allowed to fill the log.
    if (++p->unexpected > max_unexpected_updates) {
      p->conn->send_error_and_close("protocol error: too many updates that answer no task", 1);
      return {};
    }
    FEDL_LOG_WARN("update from {} dropped: {}", p->site, why);
    ++m_rejected[late ? "late" : "unexpected"];
    if (late && m_late_recorded.insert({p->site, task}).second) {
      m_late.push_back({{"site", p->site}, {"round", round}, {"reason", why}});
    }
    return {};
  }
  const auto dir = m_ws.state() / "incoming";
  p->part = dir / fmt::format("round-{:06}-{}.part", m_round, p->site);
  p->fd = ::open(p->part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (p->fd < 0) {
    // The coordinator's problem (descriptors, disk), not the site's: this update is lost and the
    // site recorded as dropped; the round goes on with the others.
    FEDL_LOG_ERROR("cannot store the update of {} in {}: {}", p->site, p->part.string(), std::strerror(errno));
    it->second.state = Participant::State::dropped;
    it->second.note = fmt::format("the coordinator could not store its update: {}", std::strerror(errno));
    check_round_complete();
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
    auto message = valid_utf8(header.value("message", std::string("(no message)")), max_error_text);
    FEDL_LOG_WARN("site {} reports: {}", p->site, message);
    if (const auto it = m_participants.find(p->site); it != m_participants.end() &&
                                                      it->second.state == Participant::State::pending &&
                                                      header_uint(header, "task") == m_task) {
      it->second.state = Participant::State::dropped;
      it->second.note = std::move(message);
      check_round_complete();
    }
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
  const auto claimed = header.value("site", std::string());
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
  json welcome = {{"round", m_round},
                  {"rounds", m_s.rounds},
                  {"heartbeat", m_s.heartbeat},
                  {"ca_fingerprint", certificate_fingerprint(m_ca)}};
  // What the ledger says this site spent: a site with a budget counts the larger of this and its
  // own account, and refuses to go on if its account is missing or shorter.
  if (auto spent = m_privacy.site_report(p->site); !spent.is_null()) {
    welcome["privacy"] = std::move(spent);
  }
  p->conn->send(FrameType::welcome, welcome);
  // A site that reconnects during a round it was asked to train gets its task again.
  if (m_phase == Phase::running) {
    if (const auto it = m_participants.find(p->site);
        it != m_participants.end() && it->second.state == Participant::State::pending) {
      it->second.disconnected_at = 0;
      send_task(*p);
    }
  }
  if (m_phase == Phase::finishing) {
    p->conn->send(FrameType::done, {{"rounds", m_round - 1}, {"reason", m_reason}, {"ledger_head", m_head}});
  }
  maybe_start_round();
}

void
Coordinator::on_update(const std::shared_ptr<Peer>& p, const json& header)
{
  if (p->fd < 0) {
    return; // dropped in on_head, already logged
  }
  ::close(p->fd);
  p->fd = -1;
  const auto file = p->part.parent_path() / fmt::format("round-{:06}-{}.safetensors", m_round, p->site);
  std::error_code ec;
  fs::rename(p->part, file, ec);
  if (ec) {
    fail(fmt::format("cannot store an update as {}: {}", file.string(), ec.message()));
    return;
  }
  auto& part = m_participants[p->site];
  part.state = Participant::State::received;
  m_answered.insert({p->site, m_task});
  part.file = file;
  if (const auto m = header.find("metrics"); m != header.end()) {
    part.metrics = bounded_metrics(*m);
  }
  FEDL_LOG_DEBUG("round {}: update from {} ({} bytes)", m_round, p->site, fs::file_size(file, ec));
  check_round_complete();
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
    if (m_phase != Phase::stopped && !p->replaced && !p->removed) {
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
  if (m_phase == Phase::finishing || m_phase == Phase::stopped) {
    return;
  }
  FEDL_LOG_WARN("site {} disconnected: {} ({} connected)", p->site, reason, m_sites.size());
  if (m_phase == Phase::running) {
    if (const auto pit = m_participants.find(p->site);
        pit != m_participants.end() && pit->second.state == Participant::State::pending) {
      // Not dropped at once: a site that comes back within the grace gets its task again (a
      // network blip must not cost it the round, or the round its quorum).
      pit->second.disconnected_at = FramedConnection::now();
      pit->second.note = "disconnected: " + reason;
    }
  }
}

void
Coordinator::maybe_start_round()
{
  if (m_phase != Phase::waiting) {
    return;
  }
  const double now = FramedConnection::now();
  if (now < m_not_before) {
    return;
  }
  if (m_sites.size() < m_s.min_clients) {
    m_quorum_since = 0;
    if (m_s.wait_timeout > 0 && now - m_waiting_since > m_s.wait_timeout) {
      fail(fmt::format("only {} of the {} sites that round {} needs connected within --wait-timeout {} s",
                       m_sites.size(), m_s.min_clients, m_round, m_s.wait_timeout));
    }
    return;
  }
  if (m_quorum_since == 0) {
    m_quorum_since = now;
  }
  // Give sites that are connecting at the same moment a chance to be in this round.
  if (m_sites.size() < m_clients.size() && now - m_quorum_since < m_s.settle) {
    return;
  }
  start_round();
}

void
Coordinator::start_round()
{
  refresh_trust();
  if (m_sites.size() < m_s.min_clients) {
    return;
  }
  const auto& privacy = m_s.privacy;
  std::size_t asked = m_sites.size();
  if (m_s.clients_per_round > 0) {
    asked = std::min<std::size_t>(m_s.clients_per_round, m_sites.size());
  } else if (m_s.fraction > 0) {
    asked = static_cast<std::size_t>(std::ceil(m_s.fraction * static_cast<double>(m_sites.size())));
  }
  asked = std::clamp<std::size_t>(asked, std::min<std::size_t>(m_s.min_clients, m_sites.size()), m_sites.size());
  m_client_dp.reset();
  if (privacy.noise_multiplier > 0) {
    // Each site is in the round with probability asked / connected (the rate the accountant
    // composes; a site not connected is in no round).
    const double q = static_cast<double>(asked) / static_cast<double>(m_sites.size());
    if (privacy.max_epsilon > 0) {
      const double next = projected_epsilon(q);
      if (next > privacy.max_epsilon) {
        FEDL_LOG_WARN("round {} would take the federation's epsilon to {:.4g} (delta {:g}), past --max-epsilon {:g}: "
                      "stopping",
                      m_round, next, privacy.delta, privacy.max_epsilon);
        finish("privacy-budget", {{"epsilon", m_privacy.client().epsilon(privacy.delta).epsilon},
                                  {"next_round_epsilon", next},
                                  {"max_epsilon", privacy.max_epsilon},
                                  {"delta", privacy.delta}});
        return;
      }
    }
    m_client_dp = ClientDpRound{privacy.clip_norm, privacy.noise_multiplier, q, privacy.delta};
    m_client_dp_asked = static_cast<std::uint32_t>(asked);
  }
  ++m_attempt;
  update_head();
  m_task = m_task_rng() | 1;
  m_issued[m_task] = m_round;
  std::vector<std::string> names;
  for (const auto& [name, p] : m_sites) {
    names.push_back(name);
  }
  const std::size_t k = asked;
  // Seeded: the same seed, round, attempt and connected sites choose the same participants.
  std::mt19937_64 rng(mix(m_s.seed ^ mix(m_round ^ mix(m_attempt))));
  std::shuffle(names.begin(), names.end(), rng);
  names.resize(k);
  std::sort(names.begin(), names.end());
  m_participants.clear();
  for (const auto& name : names) {
    m_participants[name] = Participant{};
  }
  m_phase = Phase::running;
  m_round_started = FramedConnection::now();
  m_deadline = m_round_started + m_s.round_timeout;
  FEDL_LOG_INFO("round {}/{}{}: training on {} of {} sites: {}", m_round, m_s.rounds,
                m_attempt > 1 ? fmt::format(" (attempt {})", m_attempt) : "", k, m_sites.size(),
                fmt::join(names, ", "));
  for (const auto& name : names) {
    send_task(*m_sites[name]);
  }
}

void
Coordinator::send_task(Peer& p)
{
  const auto bytes = m_model->bytes();
  p.conn->send(FrameType::task,
               {{"round", m_round},
                {"attempt", m_attempt},
                {"task", m_task},
                {"deadline", std::max(0.0, m_deadline - FramedConnection::now())},
                {"seed", m_s.seed + m_round},
                {"training", to_json(m_s.training)},
                {"base_sha256", m_model_sha},
                {"ledger_head", m_head}},
               {bytes}, m_model);
}

void
Coordinator::check_round_complete()
{
  if (m_phase != Phase::running) {
    return;
  }
  const double now = FramedConnection::now();
  bool pending = false;
  for (auto& [name, part] : m_participants) {
    if (part.state == Participant::State::pending && part.disconnected_at > 0 &&
        now - part.disconnected_at >= reconnect_grace()) {
      FEDL_LOG_WARN("round {}: {} did not come back within {:.0f} s; going on without it", m_round, name,
                    reconnect_grace());
      part.state = Participant::State::dropped;
    }
    pending = pending || part.state == Participant::State::pending;
  }
  if (!pending) {
    finish_attempt("every site answered");
  }
}

void
Coordinator::finish_attempt(const std::string& why)
{
  std::vector<RoundCandidate> candidates;
  json late = m_late;
  m_late = json::array();
  json dropped = json::array();
  json site_metrics = json::object();
  for (auto& [name, part] : m_participants) {
    switch (part.state) {
    case Participant::State::received:
      candidates.push_back({part.file, name, true});
      site_metrics[name] = part.metrics;
      break;
    case Participant::State::pending:
      late.push_back({{"site", name}, {"round", m_round}, {"reason", "no update by the deadline"}});
      ++m_rejected["late"];
      if (const auto it = m_sites.find(name); it != m_sites.end()) {
        discard_part(*it->second);
      }
      break;
    case Participant::State::dropped:
      dropped.push_back({{"site", name}, {"reason", part.note}});
      break;
    }
  }
  FEDL_LOG_DEBUG("round {}: closing the attempt ({}), {} updates", m_round, why, candidates.size());
  m_phase = Phase::aggregating;
  const json extra = {
    {"attempt", m_attempt}, {"asked", m_participants.size()}, {"late", late},
    {"dropped", dropped},   {"site_metrics", site_metrics},   {"seconds", FramedConnection::now() - m_round_started}};
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  m_round_thread = std::thread([this, candidates = std::move(candidates), extra] {
    json result;
    std::string failure;
    std::string retry;
    try {
      const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
      const auto plan = plan_workspace_round(m_ws);
      if (plan.round != m_round) {
        throw Error("the ledger is at round {} where this coordinator expected {}: another process wrote a round; "
                    "restart fedl serve",
                    plan.round, m_round);
      }
      const auto validated = validate_round(plan, candidates, OnBadUpdate::skip);
      if (validated.accepted.size() < m_s.min_clients) {
        retry = fmt::format("{} valid updates of {} asked, below the quorum of {}", validated.accepted.size(),
                            extra["asked"].get<std::size_t>(), m_s.min_clients);
        json body = extra;
        body["round"] = m_round;
        body["reason"] = retry;
        body["rejected"] = validated.rejected;
        append_signed(m_ws, "round-failed", body);
      } else {
        RoundSettings settings{m_s.strategy, m_s.server, m_evaluate, extra, m_client_dp, std::nullopt};
        if (m_client_dp) {
          settings.options.client_dp = ServerOptions::ClientDp{m_client_dp->noise_multiplier * m_client_dp->clip_norm,
                                                               double(m_client_dp_asked), 0};
          settings.options.clip_norm = m_client_dp->clip_norm;
        }
        if (m_s.privacy.max_epsilon > 0) {
          settings.max_epsilon = m_s.privacy.max_epsilon;
        }
        result = commit_round(validated, settings).ledger_body;
      }
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "an unknown error";
    }
    asio::post(m_io, [this, result, failure, retry]() mutable {
      if (!failure.empty()) {
        // The round thread is done: stop now (fail() would wait for it while aggregating).
        m_phase = Phase::waiting;
        const auto message = fmt::format("round {} could not be completed: {}", m_round, failure);
        FEDL_LOG_ERROR("{}; stopping (the round is run again when fedl serve starts)", message);
        fail(message);
      } else if (!retry.empty()) {
        round_failed(retry);
      } else {
        round_done(std::move(result));
      }
    });
  });
}

void
Coordinator::round_failed(const std::string& why)
{
  clean_incoming();
  ++m_retries;
  // Back off before the next attempt (1, 2, 4 ... 30 s): a cause that persists (bad settings at
  // every site, a site that always fails) must not spin attempts and ledger entries.
  const double delay = std::min(30.0, std::pow(2.0, std::min<double>(m_failed_in_a_row++, 5)));
  FEDL_LOG_WARN("round {} attempt {} is not counted: {}; it will be run again in {:.0f} s", m_round, m_attempt, why,
                delay);
  m_phase = Phase::waiting;
  m_waiting_since = FramedConnection::now() + delay;
  m_not_before = m_waiting_since;
  m_quorum_since = 0;
  if (m_interrupted) {
    stop_now();
    return;
  }
  maybe_start_round();
}

void
Coordinator::round_done(json result)
{
  clean_incoming();
  const double seconds = FramedConnection::now() - m_round_started;
  m_last_round_seconds = seconds;
  m_round_seconds_sum += seconds;
  ++m_rounds_done;
  const auto& body = result;
  m_updates_accepted += body.at("participants").size();
  for (const auto& r : body.at("rejected")) {
    (void)r;
    ++m_rejected["invalid"];
  }
  std::string acc_text;
  if (body.contains("evaluation") && body["evaluation"].contains("accuracy")) {
    m_accuracy = body["evaluation"]["accuracy"].get<double>();
    acc_text = fmt::format(", accuracy {:.2f}%", *m_accuracy * 100);
  }
  m_privacy.replay(body, /*verify=*/false);
  acc_text += round_privacy_text(body);
  FEDL_LOG_INFO("round {}/{} done: {} updates{}{}, {:.2f} s", m_round, m_s.rounds, body.at("participants").size(),
                body.at("rejected").empty() ? "" : fmt::format(" ({} rejected)", body.at("rejected").size()), acc_text,
                seconds);
  try {
    m_model = std::make_shared<MappedFile>(m_ws.root() / body.at("model").at("file").get<std::string>());
    m_model_sha = body.at("model").at("sha256").get<std::string>();
  } catch (const std::exception& e) {
    fail(e.what());
    return;
  }
  ++m_round;
  m_attempt = 0;
  m_failed_in_a_row = 0;
  m_late_recorded.clear();
  m_participants.clear();
  std::erase_if(m_issued, [this](const auto& task) { return task.second + 1 < m_round; });
  std::erase_if(m_answered, [this](const auto& answer) { return m_issued.count(answer.second) == 0; });
  if (m_round > m_s.rounds) {
    finish("rounds");
    return;
  }
  if (m_s.target_accuracy && m_accuracy && *m_accuracy >= *m_s.target_accuracy) {
    finish("target-accuracy");
    return;
  }
  if (m_interrupted) {
    stop_now();
    return;
  }
  m_phase = Phase::waiting;
  m_waiting_since = FramedConnection::now();
  m_quorum_since = 0;
  maybe_start_round();
}

double
Coordinator::projected_epsilon(double q) const
{
  auto next = m_privacy.client();
  next.add(q, m_s.privacy.noise_multiplier, 1);
  return next.epsilon(m_s.privacy.delta).epsilon;
}

void
Coordinator::finish(const std::string& reason, json details)
{
  m_reason = reason;
  m_phase = Phase::finishing;
  FEDL_LOG_INFO("federation finished after round {} ({}); telling {} sites", m_round - 1,
                reason == "rounds"           ? "all rounds done"
                : reason == "privacy-budget" ? "privacy budget spent"
                                             : "target accuracy reached",
                m_sites.size());
  try {
    const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
    details["round"] = m_round - 1;
    details["reason"] = reason;
    append_signed(m_ws, "finished", details);
  } catch (const Error& e) {
    FEDL_LOG_WARN("could not record the end in the ledger: {}", e.what());
  }
  update_head();
  for (const auto& [name, p] : m_sites) {
    p->conn->send(FrameType::done, {{"rounds", m_round - 1}, {"reason", reason}, {"ledger_head", m_head}});
  }
  m_finish_at = FramedConnection::now() + finish_linger;
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
    if (m_interrupted) {
      FEDL_LOG_WARN("{} again: stopping now", what);
      stop_now();
      return;
    }
    FEDL_LOG_WARN("{}: stopping{}", what,
                  m_phase == Phase::aggregating ? " once this round is written (again to stop now)" : "");
    m_interrupted = true;
    if (m_phase != Phase::aggregating) {
      stop_now();
    } else {
      wait_for_signal();
    }
  });
}

void
Coordinator::stop_now()
{
  m_phase = Phase::stopped;
  flush_refusals(FramedConnection::now(), true);
  std::error_code ec;
  m_acceptor.close(ec);
  m_metrics_acceptor.close(ec);
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
  if (m_phase == Phase::aggregating) {
    m_interrupted = true; // stop once the round thread is done
    return;
  }
  stop_now();
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
    m_head = signed_head(m_identity, ledger_head(m_ws.ledger()), certificate_fingerprint(m_ca));
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
    check_round_complete();
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
  if (m_phase == Phase::running && now >= m_deadline) {
    FEDL_LOG_WARN("round {}: deadline of {} s reached", m_round, m_s.round_timeout);
    finish_attempt("deadline");
  }
  if (m_phase == Phase::waiting) {
    maybe_start_round();
  }
  if (m_phase == Phase::finishing) {
    bool drained = true;
    for (const auto& [name, p] : m_sites) {
      drained = drained && p->conn->queued() == 0;
    }
    if (drained || now >= m_finish_at) {
      stop_now();
      return;
    }
  }
  if (m_phase == Phase::stopped) {
    return;
  }
  m_tick.expires_after(std::chrono::milliseconds(m_phase == Phase::finishing ? 20 : 100));
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
  std::string t;
  const auto metric = [&](const char* name, const char* type, const char* help, const std::string& samples) {
    t += fmt::format("# HELP {} {}\n# TYPE {} {}\n{}", name, help, name, type, samples);
  };
  metric("fedl_round", "gauge", "The round being run (or next to run).", fmt::format("fedl_round {}\n", m_round));
  metric("fedl_rounds_completed_total", "counter", "Rounds completed by this coordinator process.",
         fmt::format("fedl_rounds_completed_total {}\n", m_rounds_done));
  metric("fedl_rounds_retried_total", "counter", "Round attempts that missed the quorum and were run again.",
         fmt::format("fedl_rounds_retried_total {}\n", m_retries));
  metric("fedl_connected_sites", "gauge", "Sites connected and admitted.",
         fmt::format("fedl_connected_sites {}\n", m_sites.size()));
  metric("fedl_round_duration_seconds", "summary", "Duration of completed rounds, from tasks sent to ledger entry.",
         fmt::format("fedl_round_duration_seconds_sum {}\nfedl_round_duration_seconds_count {}\n", m_round_seconds_sum,
                     m_rounds_done));
  metric("fedl_last_round_duration_seconds", "gauge", "Duration of the last completed round.",
         fmt::format("fedl_last_round_duration_seconds {}\n", m_last_round_seconds));
  metric("fedl_received_bytes_total", "counter", "Bytes received from sites (TLS payload).",
         fmt::format("fedl_received_bytes_total {}\n", in));
  metric("fedl_sent_bytes_total", "counter", "Bytes sent to sites (TLS payload).",
         fmt::format("fedl_sent_bytes_total {}\n", out));
  metric("fedl_updates_accepted_total", "counter", "Updates aggregated.",
         fmt::format("fedl_updates_accepted_total {}\n", m_updates_accepted));
  std::string rejected;
  for (const char* reason : {"invalid", "late", "unexpected"}) {
    const auto it = m_rejected.find(reason);
    rejected +=
      fmt::format("fedl_updates_rejected_total{{reason=\"{}\"}} {}\n", reason, it == m_rejected.end() ? 0 : it->second);
  }
  metric("fedl_updates_rejected_total", "counter", "Updates left out, by reason.", rejected);
  metric("fedl_connections_refused_total", "counter", "Connections refused at the TLS handshake or at hello.",
         fmt::format("fedl_connections_refused_total {}\n", m_refused));
  if (m_accuracy) {
    metric("fedl_accuracy", "gauge", "Test accuracy of the latest global model.",
           fmt::format("fedl_accuracy {}\n", *m_accuracy));
  }
  return t;
}

void
Coordinator::accept_metrics()
{
  m_metrics_acceptor.async_accept([this](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && m_phase != Phase::stopped) {
        m_accept_pause.expires_after(std::chrono::milliseconds(200));
        m_accept_pause.async_wait([this](const std::error_code& e) {
          if (!e) {
            accept_metrics();
          }
        });
      }
      return;
    }
    // A minimal HTTP/1.0 responder: read the request head (at most 8 KiB), answer, close.
    struct Exchange
    {
      tcp::socket socket;
      asio::steady_timer timeout;
      std::array<char, 8192> buf{};
      std::size_t used = 0;
      std::string reply;
    };
    auto ex = std::make_shared<Exchange>(Exchange{std::move(socket), asio::steady_timer(m_io), {}, 0, {}});
    // A scraper that connects and says nothing must not hold a descriptor for ever.
    ex->timeout.expires_after(std::chrono::seconds(5));
    ex->timeout.async_wait([ex](const std::error_code& e) {
      if (!e) {
        std::error_code ignored;
        ex->socket.close(ignored);
      }
    });
    auto read = std::make_shared<std::function<void()>>();
    *read = [this, ex, read] {
      ex->socket.async_read_some(
        asio::buffer(ex->buf.data() + ex->used, ex->buf.size() - ex->used),
        [this, ex, read](const std::error_code& error, std::size_t n) {
          if (error) {
            *read = nullptr;
            return;
          }
          ex->used += n;
          const std::string_view head(ex->buf.data(), ex->used);
          if (head.find("\r\n\r\n") == std::string_view::npos && head.find("\n\n") == std::string_view::npos &&
              ex->used < ex->buf.size()) {
            (*read)();
            return;
          }
          *read = nullptr;
          const bool ok = head.starts_with("GET /metrics ") || head.starts_with("GET / ");
          const auto body = ok ? metrics_text() : std::string("not found: try /metrics\n");
          ex->reply = fmt::format("HTTP/1.0 {}\r\nContent-Type: text/plain; version=0.0.4; "
                                  "charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                                  ok ? "200 OK" : "404 Not Found", body.size(), body);
          asio::async_write(ex->socket, asio::buffer(ex->reply), [ex](const std::error_code&, std::size_t) {
            std::error_code ignored;
            ex->timeout.cancel();
            ex->socket.shutdown(tcp::socket::shutdown_both, ignored);
          });
        });
    };
    (*read)();
    accept_metrics();
  });
}

json
Coordinator::run()
{
  m_started = FramedConnection::now();
  // One entry at a time: a coordinator that resumes a long federation must not hold the parsed
  // ledger (some 10 bytes per byte of it) for its whole run.
  LatestModel latest;
  json last_dp;    // the latest round's privacy, if it had client-level DP
  json last_entry; // {kind, body} of the ledger's last entry
  for_each_workspace_entry(m_ws, [&](LedgerEntry&& e) {
    latest.update(e);
    if (e.kind == "round") {
      m_accuracy.reset();
      if (const auto ev = e.body.find("evaluation");
          ev != e.body.end() && ev->is_object() && ev->contains("accuracy") && (*ev)["accuracy"].is_number()) {
        m_accuracy = (*ev)["accuracy"].get<double>();
      }
      m_privacy.replay(e.body, /*verify=*/false);
      if (const auto p = e.body.find("privacy"); p != e.body.end() && p->is_object() && p->contains("client")) {
        last_dp = *p;
      }
    }
    last_entry = {{"kind", e.kind}, {"body", std::move(e.body)}};
  });
  m_round = latest.round + 1;
  m_first_round = m_round;
  // A restart must not quietly weaken what the rounds so far promised: no client-level DP, less
  // noise, a larger clip, or a budget dropped or raised.
  if (!last_dp.is_null()) {
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
                       m_round - 1, clip, noise,
                       last_dp.contains("max_epsilon") ? fmt::format(", budget {:g}", last_dp.value("max_epsilon", 0.0))
                                                       : std::string(),
                       last_dp.contains("max_epsilon") ? ", --max-epsilon" : "", p.clip_norm, p.noise_multiplier,
                       p.max_epsilon > 0 ? fmt::format(", budget {:g}", p.max_epsilon) : std::string(", no budget"));
    }
  }
  const auto summary = [&](const std::string& reason) {
    json j = {{"rounds_completed", m_round - 1},
              {"rounds_run", m_rounds_done},
              {"first_round", m_first_round},
              {"reason", reason},
              {"interrupted", reason == "interrupted"},
              {"retries", m_retries},
              {"model", Workspace::model_name(m_round - 1)},
              {"model_sha256", m_model_sha},
              {"seconds", FramedConnection::now() - m_started}};
    j["accuracy"] = m_accuracy ? json(*m_accuracy) : json(nullptr);
    return j;
  };
  m_model = std::make_shared<MappedFile>(m_ws.root() / latest.file);
  m_model_sha = latest.sha256;
  if (sha256_hex(m_model->bytes()) != m_model_sha) {
    throw VerifyError("{} does not match the ledger: it was replaced or altered; run fedl audit {}",
                      (m_ws.root() / latest.file).string(), m_ws.root().string());
  }
  if (m_round > m_s.rounds || (m_s.target_accuracy && m_accuracy && *m_accuracy >= *m_s.target_accuracy)) {
    FEDL_LOG_INFO("the federation is already complete ({} rounds in the ledger); nothing to do", m_round - 1);
    return summary("already-complete");
  }
  if (const auto& p = m_s.privacy; p.max_epsilon > 0) {
    // The smallest sampling rate a round can have: the quorum out of every enrolled site.
    const auto enrolled = std::max<std::size_t>(load_config(m_ws.config()).clients.size(), 1);
    const double q = std::min(1.0, std::max<double>(m_s.min_clients, 1) / static_cast<double>(enrolled));
    const double spent = m_privacy.client().epsilon(p.delta).epsilon;
    const double next = projected_epsilon(q);
    if (next > p.max_epsilon) {
      const bool recorded =
        last_entry.value("kind", "") == "finished" && last_entry["body"].value("reason", "") == "privacy-budget";
      if (!recorded) {
        const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
        append_signed(m_ws, "finished",
                      {{"round", m_round - 1},
                       {"reason", "privacy-budget"},
                       {"epsilon", spent},
                       {"next_round_epsilon", next},
                       {"max_epsilon", p.max_epsilon},
                       {"delta", p.delta}});
      }
      throw Error(
        ExitCode::budget,
        "the federation's privacy budget allows no further round: epsilon {:.4g} after {} rounds with "
        "client-level DP, and one more round (at the lowest sampling rate, {:.3g}) would make it {:.4g}, past "
        "--max-epsilon {:g} at delta {:g}",
        spent, m_privacy.client_rounds(), q, next, p.max_epsilon, p.delta);
    }
    FEDL_LOG_INFO("privacy: epsilon {:.4g} of {:g} spent at delta {:g} ({} rounds with client-level DP)", spent,
                  p.max_epsilon, p.delta, m_privacy.client_rounds());
  }
  m_max_update = m_model->bytes().size() + update_slack;
  // Each site holds a socket (and an update file while it uploads): take every descriptor the
  // hard limit allows rather than the soft default of 1024.
  if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
  }
  fs::create_directories(m_ws.state() / "incoming");
  clean_incoming();
  load_trust(true);
  listen();
  {
    const WorkspaceLock lock(m_ws, WorkspaceLock::Kind::change, 30);
    json settings = m_s.to_json();
    settings["resume_round"] = m_round;
    append_signed(m_ws, "serve", settings);
  }
  FEDL_LOG_INFO("serving {} on {}: round {} of {}, {} known sites, quorum {}", m_ws.root().string(),
                m_s.listen.to_string(), m_round, m_s.rounds, m_clients.size(), m_s.min_clients);
  if (m_s.metrics) {
    FEDL_LOG_INFO("metrics at http://{}/metrics", m_s.metrics->to_string());
    accept_metrics();
  }
  wait_for_signal();
  m_waiting_since = FramedConnection::now();
  accept();
  on_tick();
  m_io.run();
  if (m_round_thread.joinable()) {
    m_round_thread.join();
  }
  std::error_code ec;
  if (!m_failure.empty()) {
    throw Error("{}", m_failure);
  }
  if (m_interrupted) {
    return summary("interrupted");
  }
  return summary(m_reason);
}

} // namespace

json
ServeSettings::to_json() const
{
  json j = {{"listen", listen.to_string()},
            {"rounds", rounds},
            {"min_clients", min_clients},
            {"clients_per_round", clients_per_round},
            {"fraction", fraction},
            {"round_timeout", round_timeout},
            {"wait_timeout", wait_timeout},
            {"strategy", strategy.to_string()},
            {"server_optimizer",
             {{"lr", server.server_lr},
              {"momentum", server.momentum},
              {"beta1", server.beta1},
              {"beta2", server.beta2},
              {"tau", server.tau}}},
            {"training", core::to_json(training)},
            {"seed", seed},
            {"heartbeat", heartbeat}};
  if (server.clip_norm) {
    j["clip_norm"] = *server.clip_norm;
  }
  if (privacy != PrivacyConfig{}) {
    j["privacy"] = core::to_json(privacy);
  }
  if (eval_data) {
    j["eval_data"] = eval_data->string();
  }
  if (target_accuracy) {
    j["target_accuracy"] = *target_accuracy;
  }
  if (metrics) {
    j["metrics"] = metrics->to_string();
  }
  return j;
}

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
