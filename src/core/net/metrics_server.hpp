// SPDX-License-Identifier: Apache-2.0
// `fedl serve --metrics HOST:PORT`: a minimal HTTP/1.0 responder on the coordinator's Asio
// thread. GET /metrics (or /) answers with the Prometheus text that a callback renders; anything
// else is 404. A request head is read up to 8 KiB and 5 s, then the connection is closed.
#pragma once

#include "core/net/tls.hpp"

#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>

#include <functional>
#include <string>

namespace fedl::core {

class MetricsServer
{
public:
  using Render = std::function<std::string()>;

  // Listens on `where` (see listen_on; errors name --metrics).
  MetricsServer(asio::io_context& io, const HostPort& where, Render render);

  void start();
  void close();

private:
  void accept();
  void answer(asio::ip::tcp::socket socket);

  asio::io_context& m_io;
  asio::ip::tcp::acceptor m_acceptor;
  asio::steady_timer m_pause;
  Render m_render;
  bool m_closed = false;
};

} // namespace fedl::core
