// SPDX-License-Identifier: Apache-2.0
#include "core/net/peer_pool.hpp"

#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>

namespace fedl::core {

using tcp = asio::ip::tcp;

PeerPool::PeerPool(tcp::acceptor& acceptor, const PoolLimits& limits, Make make)
  : m_acceptor(acceptor), m_pause(acceptor.get_executor()), m_limits(limits), m_make(std::move(make))
{
}

void
PeerPool::start()
{
  accept();
}

void
PeerPool::accept()
{
  m_acceptor.async_accept([this](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && !m_closed) {
        // Out of descriptors (EMFILE) or memory: retrying at once would spin; pause a little.
        FEDL_LOG_WARN("accept failed: {} (if it says too many open files, raise the limit: ulimit -n)", ec.message());
        m_pause.expires_after(std::chrono::milliseconds(200));
        m_pause.async_wait([this](const std::error_code& e) {
          if (!e) {
            accept();
          }
        });
      }
      return;
    }
    // Connections that are not admitted yet cost a descriptor and a TLS state each, and anyone
    // can open them.
    std::error_code ep_error;
    const auto address = socket.remote_endpoint(ep_error).address().to_string();
    std::size_t unadmitted = 0;
    std::size_t from_address = 0;
    std::shared_ptr<PooledPeer> oldest;
    for (const auto& [id, peer] : m_peers) {
      if (!peer->admitted && peer->conn->is_open()) {
        ++unadmitted;
        from_address += peer->address == address ? 1 : 0;
        oldest = oldest ? oldest : peer;
      }
    }
    if (from_address >= m_limits.max_unadmitted_per_address) {
      ++m_refused;
      std::error_code ignored;
      socket.close(ignored);
      FEDL_LOG_DEBUG("refused a connection from {}: {} of its connections have not said hello yet", address,
                     from_address);
      accept();
      return;
    }
    if (unadmitted >= m_limits.max_unadmitted && oldest) {
      FEDL_LOG_DEBUG("closing the oldest of {} connections that have not said hello yet", unadmitted);
      oldest->conn->close("too many connections waiting for hello");
    }
    try {
      if (auto peer = m_make(std::move(socket))) {
        peer->id = m_next_id++;
        peer->address = address;
        peer->accepted_at = FramedConnection::now();
        m_peers[peer->id] = peer;
        peer->conn->start();
      }
    } catch (const Error& e) {
      FEDL_LOG_WARN("dropping a connection: {}", e.what());
    }
    if (!m_closed) {
      accept();
    }
  });
}

void
PeerPool::close(double now)
{
  m_closed = true;
  flush_refusals(now, true);
  std::error_code ec;
  m_acceptor.close(ec);
  m_pause.cancel();
  for (const auto& [id, p] : std::map(m_peers)) {
    p->conn->close("the coordinator is stopping");
  }
}

void
PeerPool::closed(const PooledPeer& peer)
{
  m_bytes_in_closed += peer.conn->bytes_in();
  m_bytes_out_closed += peer.conn->bytes_out();
  m_peers.erase(peer.id);
}

void
PeerPool::tick(double now)
{
  flush_refusals(now, false);
  for (const auto& [id, p] : std::map(m_peers)) {
    auto& c = *p->conn;
    if (!c.is_open()) {
      continue;
    }
    if (c.closing_since() > 0 && now - c.closing_since() > m_limits.close_linger) {
      c.close("it did not take its error message in time");
    } else if (!p->admitted && now - p->accepted_at > m_limits.admit_timeout) {
      c.close(fmt::format("no hello within {} s", m_limits.admit_timeout));
    } else if (c.ready() && now - c.last_received() > m_limits.dead_after) {
      c.close(fmt::format("nothing received for {:.0f} s", now - c.last_received()));
    } else if (c.ready() && c.queued() == 0 && now - c.last_sent() >= m_limits.heartbeat) {
      c.send(FrameType::heartbeat, nlohmann::json::object());
    }
  }
}

void
PeerPool::refuse(double now, const std::string& text)
{
  ++m_refused;
  flush_refusals(now, false);
  if (m_refusals_logged < m_limits.refusal_burst) {
    ++m_refusals_logged;
    FEDL_LOG_WARN("{}", text);
  } else {
    ++m_refusals_unlogged;
  }
}

void
PeerPool::flush_refusals(double now, bool final)
{
  if (!final && now - m_refusal_window < m_limits.refusal_window) {
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

std::uint64_t
PeerPool::bytes_in() const
{
  std::uint64_t n = m_bytes_in_closed;
  for (const auto& [id, p] : m_peers) {
    n += p->conn->bytes_in();
  }
  return n;
}

std::uint64_t
PeerPool::bytes_out() const
{
  std::uint64_t n = m_bytes_out_closed;
  for (const auto& [id, p] : m_peers) {
    n += p->conn->bytes_out();
  }
  return n;
}

} // namespace fedl::core
