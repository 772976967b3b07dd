// SPDX-License-Identifier: Apache-2.0
#include "core/net/metrics_server.hpp"

#include <asio/write.hpp>
#include <fmt/format.h>

#include <array>
#include <memory>

namespace fedl::core {

using tcp = asio::ip::tcp;

MetricsServer::MetricsServer(asio::io_context& io, const HostPort& where, Render render)
  : m_io(io), m_acceptor(io), m_pause(io), m_render(std::move(render))
{
  listen_on(m_acceptor, where, "--metrics");
}

void
MetricsServer::start()
{
  accept();
}

void
MetricsServer::close()
{
  m_closed = true;
  std::error_code ec;
  m_acceptor.close(ec);
  m_pause.cancel();
}

void
MetricsServer::accept()
{
  m_acceptor.async_accept([this](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && !m_closed) {
        // Out of descriptors: retrying at once would spin.
        m_pause.expires_after(std::chrono::milliseconds(200));
        m_pause.async_wait([this](const std::error_code& e) {
          if (!e) {
            accept();
          }
        });
      }
      return;
    }
    answer(std::move(socket));
    accept();
  });
}

void
MetricsServer::answer(tcp::socket socket)
{
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
        const auto body = ok ? m_render() : std::string("not found: try /metrics\n");
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
}

} // namespace fedl::core
