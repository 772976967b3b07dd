// SPDX-License-Identifier: Apache-2.0
// The coordinator's connections below its protocol: accepting (pausing when out of descriptors),
// the bounds on connections not admitted yet (anyone can open them: per source address, in all,
// and a deadline to be admitted), keep-alive (a heartbeat on a quiet connection, closing a silent
// one or one that does not take its error message), the byte counts, and a log of refused
// connections that a flood of strangers cannot flood. Runs on the Asio thread that owns the
// acceptor.
#pragma once

#include "core/net/connection.hpp"

#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

namespace fedl::core {

// One accepted connection; the owner's own per-peer state derives from it.
struct PooledPeer
{
  virtual ~PooledPeer() = default;
  std::uint64_t id = 0;
  std::shared_ptr<FramedConnection> conn;
  std::string address; // the source IP address
  double accepted_at = 0;
  bool admitted = false; // set by the owner once the peer is who it says (hello)
};

struct PoolLimits
{
  std::size_t max_unadmitted = 256;           // in all; the oldest is closed to make room
  std::size_t max_unadmitted_per_address = 8; // a new one past it is closed at once
  double admit_timeout = 5;                   // seconds from accept to admission
  double close_linger = 10;                   // seconds a closing peer has to take its error message
  double heartbeat = 5;                       // seconds of quiet before a heartbeat
  double dead_after = 20;                     // seconds of silence before a peer is dropped
  std::uint32_t refusal_burst = 20;           // refusals logged one by one per window
  double refusal_window = 10;                 // seconds
};

class PeerPool
{
public:
  // Makes the peer for an accepted socket (its FramedConnection with the owner's callbacks, not
  // started; the pool fills in id, address and accepted_at); null to drop the socket. Called only
  // within the bounds.
  using Make = std::function<std::shared_ptr<PooledPeer>(asio::ip::tcp::socket socket)>;

  PeerPool(asio::ip::tcp::acceptor& acceptor, const PoolLimits& limits, Make make);

  // Accepts until close().
  void start();
  // Stops accepting, logs the refusals not yet logged, and closes every connection.
  void close(double now);

  // The owner's on_close: forgets the peer (its byte counts are kept).
  void closed(const PooledPeer& peer);
  // Once per tick: deadlines, linger, heartbeats, dead peers; and the refusal log's window.
  void tick(double now);

  // A refused connection: counted, and logged unless refusal_burst were in this window (then
  // counted for one line when the window ends, or at close).
  void refuse(double now, const std::string& text);
  // Counted only (the owner says why elsewhere).
  void count_refusal() { ++m_refused; }

  std::uint64_t refused() const noexcept { return m_refused; }
  std::uint64_t bytes_in() const;
  std::uint64_t bytes_out() const;
  const std::map<std::uint64_t, std::shared_ptr<PooledPeer>>& peers() const noexcept { return m_peers; }

private:
  void accept();
  void flush_refusals(double now, bool final);

  asio::ip::tcp::acceptor& m_acceptor;
  asio::steady_timer m_pause;
  PoolLimits m_limits;
  Make m_make;
  bool m_closed = false;
  std::uint64_t m_next_id = 1;
  std::map<std::uint64_t, std::shared_ptr<PooledPeer>> m_peers;
  std::uint64_t m_bytes_in_closed = 0;
  std::uint64_t m_bytes_out_closed = 0;
  std::uint64_t m_refused = 0;
  double m_refusal_window = 0;           // when the current window of refusal logs began
  std::uint32_t m_refusals_logged = 0;   // ... and how many were logged in it
  std::uint64_t m_refusals_unlogged = 0; // ... and how many were only counted
};

} // namespace fedl::core
