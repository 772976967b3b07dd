// SPDX-License-Identifier: Apache-2.0
// The coordinator behind run_coordinator (coordinator.hpp), private to it: coordinator.cpp holds
// its life (resume, listen, the tick, signals, stopping) and what it does for the round state
// machine (tasks, closing an attempt on the round thread, the end); coordinator_sites.cpp the
// sites' connections (TLS, hello, updates to files, errors, disconnects).
#pragma once

#include "core/federation/coordinator.hpp"
#include "core/federation/ledger_state.hpp"
#include "core/federation/round.hpp"
#include "core/federation/round_machine.hpp"
#include "core/federation/secure_round.hpp"
#include "core/net/connection.hpp"
#include "core/net/metrics_server.hpp"
#include "core/net/peer_pool.hpp"
#include "core/trust/server_trust.hpp"
#include "core/util/file_io.hpp"

#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

namespace fedl::core::serve_detail {

using tcp = asio::ip::tcp;
using json = nlohmann::json;

inline constexpr std::size_t max_error_text = 500;     // bytes of a site's error report kept
inline constexpr int max_unexpected_updates = 3;       // per connection, before it is closed
inline constexpr std::uint64_t update_slack = 4 << 20; // metadata, certificate and signature beyond the tensors

// One TCP connection, before and after the site is admitted (PooledPeer::admitted, after hello).
struct Peer : PooledPeer
{
  std::string site;        // certificate CN, once the handshake is done
  std::string fingerprint; // certificate SHA-256
  Cert cert;
  bool replaced = false; // a newer connection of the same site took over
  bool removed = false;  // revoked or removed from fedl.json while connected
  int unexpected = 0;    // updates it sent that answered no task
  // The update being received, if any, and its digest as it arrives.
  UniqueFd fd;
  std::filesystem::path part;
  std::shared_ptr<UpdateDigester> digester;
};

using Phase = RoundMachine::Phase;

// The round settings of a closed attempt.
RoundSettings attempt_settings(const ServeSettings& s, const Evaluator& evaluate, const AttemptClose& a);

// The sockets, threads and files around the round state machine.
class Coordinator final
  : public RoundHost
  , public SecureHost
{
public:
  Coordinator(const Workspace& ws, const ServeSettings& s, const Evaluator& evaluate)
    : m_ws(ws),
      m_s(s),
      m_evaluate(evaluate),
      m_rounds(s, *this, &FramedConnection::now),
      m_acceptor(m_io),
      m_tick(m_io),
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
  void finish(json details) override;
  void fail(const std::string& message) override;
  void stop() override { stop_now(); }

  // SecureHost, and the secure aggregation around it (coordinator_secure.cpp).
  void secure_send(const std::string& site, FrameType type, const json& header,
                   std::shared_ptr<const std::string> body) override;
  void secure_drop(const std::string& site, const std::string& why) override;
  // The attempt's SecureRound, made when its first task is sent; none if it cannot be (the
  // participants are then dropped with why).
  SecureRound* secure_round_for(const RoundTask& task);
  FramedConnection::BodySink on_secure_input_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix,
                                                  const json& header);
  void on_secure_frame(const std::shared_ptr<Peer>& p, FrameType type, const json& header,
                       const FramedConnection::BodySink& sink);
  // Once the machine closed a secure attempt and its stages are over: commit (or record the
  // failure) on the round thread.
  void check_secure();
  void commit_on_round_thread(std::function<AttemptOutcome()> commit);

  // Setup.
  void resume(const LedgerState& state);
  void check_budget_left(bool recorded);
  void load_tls();
  std::shared_ptr<PooledPeer> make_peer(tcp::socket socket);
  void on_tick();

  // Connections.
  void on_ready(const std::shared_ptr<Peer>& p);
  FramedConnection::BodySink on_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header);
  void on_frame(const std::shared_ptr<Peer>& p, FrameType type, json& header, const FramedConnection::BodySink& sink);
  void on_close(const std::shared_ptr<Peer>& p, const std::string& reason);
  void on_hello(const std::shared_ptr<Peer>& p, const json& header);
  void on_update(const std::shared_ptr<Peer>& p, const json& header);
  void discard_part(Peer& p);
  // A file in state/incoming/ for the body of p's update: a slot kept from an earlier attempt
  // if there is one (see clean_incoming), else a new file.
  void open_part(Peer& p);

  void attempt_done(AttemptOutcome outcome, const std::string& failure);
  void stop_now();
  void wait_for_signal();
  std::string metrics_text() const;
  // Writes the status file (WS/state/status.json) from the machine's `round` status, the sites
  // and, at the end, `end` (state, reason or error); a failure to write is logged once.
  void write_status(nlohmann::json round, const nlohmann::json& end = nullptr);
  // Once per tick: the status file, when the round's status changed or a second passed.
  void refresh_status(double now);
  // Removes what state/incoming/ holds, except the bodies being received; after an attempt
  // (`keep_slots`), the attempt's update files become slots that the next updates are written
  // over, so that their page-cache pages are reused rather than allocated afresh every round.
  void clean_incoming(bool keep_slots);
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
  std::optional<PeerPool> m_pool; // the connections, from listening on
  asio::steady_timer m_tick;
  asio::signal_set m_signals;
  std::thread m_round_thread;
  // The ledger as replayed so far, advanced by each round's plan (on the round thread, one at a
  // time) over the entries appended since, rather than read whole every round.
  LedgerState m_ledger;

  // Trust: reloaded when fedl.json or the CRL change on disk (init --add-client, --revoke).
  std::optional<ServerTrust> m_trust;
  std::shared_ptr<TlsContext> m_tls;
  double m_trust_checked = 0; // last look at fedl.json and the CRL

  std::map<std::string, std::shared_ptr<Peer>> m_sites; // admitted, by site name

  std::shared_ptr<MappedFile> m_model;
  std::string m_model_sha;
  json m_head; // the ledger head, signed, that tasks and done frames carry
  std::uint64_t m_max_update = 0;
  // Files in state/incoming/ free to take the next update bodies (clean_incoming), and the
  // number of the next slot named.
  std::vector<std::filesystem::path> m_free_slots;
  std::uint64_t m_slots_named = 0;

  // Secure aggregation: the current attempt's, and the machine's close of it while its last
  // stages run.
  std::optional<SecureRound> m_secure;
  std::optional<AttemptClose> m_secure_close;
  std::uint64_t m_secure_refused = 0; // the task of an attempt no SecureRound could be made for

  // Outcome and metrics.
  std::uint64_t m_first_round = 0;
  std::string m_failure;
  double m_started = 0;
  std::string m_started_utc;

  // The status file: the round status last written (less its countdown), when, and whether the
  // last write failed (logged once).
  json m_status_round;
  double m_status_written = 0;
  bool m_status_failed = false;
};

} // namespace fedl::core::serve_detail
