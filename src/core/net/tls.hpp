// SPDX-License-Identifier: Apache-2.0
// Mutual TLS 1.3 over Asio sockets, with OpenSSL driven directly on the non-blocking socket
// (DESIGN §4, §6). Asio's own ssl::stream moves every record through an extra 17 KiB buffer and
// one asynchronous operation per record; here SSL_write takes a whole model body at once and
// OpenSSL writes records until the socket is full, and Asio only says when the socket is ready.
//
// Both sides present certificates of the federation CA. The coordinator's context requires a
// client certificate for TLS client authentication, checked against the CA and the CRL at the
// handshake; a site's context checks the coordinator's certificate (server authentication) and
// its name. TLS 1.2 and older are refused. Everything here runs on one thread (the io_context's).
#pragma once

#include "core/trust/pki.hpp"

#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

struct ssl_ctx_st;
struct ssl_st;

namespace fedl::core {

class TlsContext
{
public:
  // The coordinator: presents `identity`, requires client certificates issued by `ca` and not
  // revoked by `crl` (may be null).
  static std::shared_ptr<TlsContext> server(const Identity& identity, const Cert& ca, const Crl* crl);
  // A site: presents `identity`, accepts a server certificate issued by `ca` for `server_name`
  // (a DNS name or an IP address).
  static std::shared_ptr<TlsContext> client(const Identity& identity, const Cert& ca, std::string server_name);

  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;
  ~TlsContext();

  ssl_ctx_st* native() const noexcept { return m_ctx; }
  bool is_server() const noexcept { return m_server; }
  const std::string& server_name() const noexcept { return m_server_name; }

private:
  TlsContext() = default;
  ssl_ctx_st* m_ctx = nullptr;
  bool m_server = false;
  std::string m_server_name;
};

// The outcome of an operation: empty `error` means success. `closed` marks a clean end of the
// peer's stream (close_notify or TCP FIN between records).
struct TlsResult
{
  std::string error;
  bool closed = false;
  explicit operator bool() const noexcept { return error.empty(); }
};

class TlsStream
{
public:
  using Handler = std::function<void(const TlsResult&)>;
  using ReadHandler = std::function<void(const TlsResult&, std::size_t)>;

  TlsStream(asio::ip::tcp::socket socket, std::shared_ptr<TlsContext> context);
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;
  ~TlsStream();

  void async_handshake(Handler handler);
  // Reads between 1 and `size` bytes (what is there).
  void async_read_some(std::byte* out, std::size_t size, ReadHandler handler);
  // Writes all of `parts` (which must stay valid until the handler runs).
  void async_write(std::vector<std::span<const std::byte>> parts, Handler handler);
  // Closes the socket at once; pending operations complete with an error.
  void close() noexcept;
  // Closes after what was written (an alert, an error frame) has reached the peer: ends the
  // sending side, then reads and discards what the peer still sends, for at most `linger` seconds
  // or until it closes too. Closing a socket with unread data in it sends a TCP reset, and a reset
  // can destroy those last bytes in the peer's receive buffer before it reads them.
  void close_gracefully(double linger) noexcept;
  bool is_open() const noexcept { return m_socket.is_open(); }

  // The peer's certificate after the handshake (null if none).
  Cert peer_certificate() const;
  // Why the peer's certificate was refused, in words (empty if it was not).
  std::string verify_failure() const;
  std::string remote() const { return m_remote; }
  // Bytes of application data the peer has taken so far (TLS records handed to the socket):
  // an owner that sees it stand still while it has more to send knows the peer stopped reading.
  std::uint64_t bytes_written() const noexcept { return m_written; }

private:
  template<typename Op, typename Done>
  void drive(Op op, Done done);
  void write_next(std::vector<std::span<const std::byte>> parts, std::size_t index, std::size_t offset,
                  Handler handler);

  asio::ip::tcp::socket m_socket;
  std::shared_ptr<TlsContext> m_context;
  ssl_st* m_ssl = nullptr;
  std::string m_remote;
  std::uint64_t m_written = 0;
};

// "HOST:PORT" (HOST may be a name, an IPv4 address, or [IPv6]); throws UsageError naming `what`.
struct HostPort
{
  std::string host;
  std::uint16_t port = 0;
  std::string to_string() const;
};
HostPort parse_host_port(const std::string& text, const std::string& what);

// Opens, binds and listens `acceptor` on `where`, an IP address (or localhost) and port; throws
// UsageError naming the flag `what` if the host is not an address, Error if it cannot listen.
void listen_on(asio::ip::tcp::acceptor& acceptor, const HostPort& where, const char* what);

} // namespace fedl::core
