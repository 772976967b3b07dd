// SPDX-License-Identifier: Apache-2.0
#include "core/net/tls.hpp"

#include "core/util/error.hpp"

#include <asio/ip/address.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>

namespace fedl::core {

namespace {

std::string
openssl_error(const char* fallback)
{
  std::string out;
  while (const auto code = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(code);
    if (!out.empty()) {
      out += "; ";
    }
    out += reason != nullptr ? reason : fmt::format("OpenSSL error {:#x}", code);
  }
  return out.empty() ? fallback : out;
}

void
check(int ok, const char* what)
{
  if (ok != 1) {
    throw Error("TLS setup failed: cannot {}: {}", what, openssl_error("unknown error"));
  }
}

SSL_CTX*
new_context(const Identity& identity)
{
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (ctx == nullptr) {
    throw Error("TLS setup failed: {}", openssl_error("cannot allocate a context"));
  }
  try {
    check(SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION), "require TLS 1.3");
    check(SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION), "require TLS 1.3");
    check(SSL_CTX_use_certificate(ctx, identity.cert.get()), "use the certificate");
    check(SSL_CTX_use_PrivateKey(ctx, identity.key.get()), "use the private key");
    check(SSL_CTX_check_private_key(ctx), "match the private key to the certificate");
    // Partial writes let one SSL_write cover a whole body, returning what fit in the socket.
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  } catch (...) {
    SSL_CTX_free(ctx);
    throw;
  }
  return ctx;
}

bool
is_ip_address(const std::string& host)
{
  std::error_code ec;
  (void)asio::ip::make_address(host, ec);
  return !ec;
}

} // namespace

std::shared_ptr<TlsContext>
TlsContext::server(const Identity& identity, const Cert& ca, const Crl* crl)
{
  std::shared_ptr<TlsContext> c(new TlsContext());
  c->m_ctx = new_context(identity);
  c->m_server = true;
  // The store checks the chain to the CA and the CRL (make_trust_store); the purpose check makes
  // the coordinator's own certificate useless as a client certificate.
  SSL_CTX_set_cert_store(c->m_ctx, make_trust_store(ca, crl).release());
  check(SSL_CTX_set_purpose(c->m_ctx, X509_PURPOSE_SSL_CLIENT), "require client certificates");
  SSL_CTX_set_verify(c->m_ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  // No session resumption: every connection proves its certificate afresh (a revoked site must
  // not come back on a ticket).
  SSL_CTX_set_num_tickets(c->m_ctx, 0);
  SSL_CTX_set_options(c->m_ctx, SSL_OP_NO_TICKET);
  return c;
}

std::shared_ptr<TlsContext>
TlsContext::client(const Identity& identity, const Cert& ca, std::string server_name)
{
  std::shared_ptr<TlsContext> c(new TlsContext());
  c->m_ctx = new_context(identity);
  c->m_server_name = std::move(server_name);
  SSL_CTX_set_cert_store(c->m_ctx, make_trust_store(ca, nullptr).release());
  check(SSL_CTX_set_purpose(c->m_ctx, X509_PURPOSE_SSL_SERVER), "require a server certificate");
  SSL_CTX_set_verify(c->m_ctx, SSL_VERIFY_PEER, nullptr);
  return c;
}

TlsContext::~TlsContext()
{
  SSL_CTX_free(m_ctx);
}

TlsStream::TlsStream(asio::ip::tcp::socket socket, std::shared_ptr<TlsContext> context)
  : m_socket(std::move(socket)), m_context(std::move(context))
{
  std::error_code ec;
  const auto ep = m_socket.remote_endpoint(ec);
  m_remote = ec ? "?"
                : (ep.address().is_v6() ? fmt::format("[{}]:{}", ep.address().to_string(), ep.port())
                                        : fmt::format("{}:{}", ep.address().to_string(), ep.port()));
  // Small frames (heartbeats, headers) must not wait for Nagle + delayed ACK (40 ms).
  m_socket.set_option(asio::ip::tcp::no_delay(true), ec);
  m_socket.non_blocking(true, ec);
  if (ec) {
    throw Error("cannot make the socket of {} non-blocking: {}", m_remote, ec.message());
  }
  m_ssl = SSL_new(m_context->native());
  if (m_ssl == nullptr || SSL_set_fd(m_ssl, m_socket.native_handle()) != 1) {
    SSL_free(m_ssl);
    throw Error("TLS setup failed for {}: {}", m_remote, openssl_error("cannot allocate a connection"));
  }
  if (m_context->is_server()) {
    SSL_set_accept_state(m_ssl);
  } else {
    SSL_set_connect_state(m_ssl);
    const auto& name = m_context->server_name();
    auto* param = SSL_get0_param(m_ssl);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    const int ok = is_ip_address(name) ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str())
                                       : X509_VERIFY_PARAM_set1_host(param, name.c_str(), name.size());
    if (!is_ip_address(name)) {
      SSL_set_tlsext_host_name(m_ssl, name.c_str());
    }
    if (ok != 1) {
      SSL_free(m_ssl);
      throw UsageError("{} is not a usable server name", name);
    }
  }
}

TlsStream::~TlsStream()
{
  SSL_free(m_ssl);
}

// Runs `op` (an SSL call) until it completes, waiting on the socket whenever OpenSSL wants to
// read or write, then calls done(ret, ssl_error).
template<typename Op, typename Done>
void
TlsStream::drive(Op op, Done done)
{
  ERR_clear_error();
  const int ret = op();
  if (ret > 0) {
    // Posted, not called: a peer whose frames OpenSSL already holds would otherwise make every
    // completion call the next read recursively until the stack runs out, and would starve the
    // other connections and the timers meanwhile.
    asio::post(m_socket.get_executor(), [done, ret]() mutable { done(ret, SSL_ERROR_NONE); });
    return;
  }
  const int err = SSL_get_error(m_ssl, ret);
  if ((err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) && m_socket.is_open()) {
    const auto what = err == SSL_ERROR_WANT_READ ? asio::ip::tcp::socket::wait_read : asio::ip::tcp::socket::wait_write;
    m_socket.async_wait(what, [this, op, done](const std::error_code& ec) mutable {
      if (ec) {
        done(-1, SSL_ERROR_SYSCALL);
        return;
      }
      drive(op, done);
    });
    return;
  }
  done(ret, err);
}

namespace {

TlsResult
failure(int err, const char* what)
{
  if (err == SSL_ERROR_ZERO_RETURN) {
    return {"the peer closed the connection", true};
  }
  auto text = openssl_error("");
  if (text.empty()) {
    text = err == SSL_ERROR_SYSCALL ? (errno != 0 ? std::strerror(errno) : "connection closed") : "TLS error";
  }
  const bool eof = err == SSL_ERROR_SYSCALL || text.find("unexpected eof") != std::string::npos;
  return {fmt::format("{}: {}", what, text), eof};
}

} // namespace

void
TlsStream::async_handshake(Handler handler)
{
  drive([this] { return SSL_do_handshake(m_ssl); },
        [handler = std::move(handler)](int ret, int err) {
          handler(ret == 1 ? TlsResult{} : failure(err, "TLS handshake failed"));
        });
}

void
TlsStream::async_read_some(std::byte* out, std::size_t size, ReadHandler handler)
{
  auto got = std::make_shared<std::size_t>(0);
  drive([this, out, size, got] { return SSL_read_ex(m_ssl, out, size, got.get()); },
        [handler = std::move(handler), got](int ret, int err) {
          if (ret == 1) {
            handler({}, *got);
          } else {
            handler(failure(err, "receive failed"), 0);
          }
        });
}

void
TlsStream::async_write(std::vector<std::span<const std::byte>> parts, Handler handler)
{
  write_next(std::move(parts), 0, 0, std::move(handler));
}

void
TlsStream::write_next(std::vector<std::span<const std::byte>> parts, std::size_t index, std::size_t offset,
                      Handler handler)
{
  while (index < parts.size() && offset == parts[index].size()) {
    ++index;
    offset = 0;
  }
  if (index == parts.size()) {
    handler({});
    return;
  }
  const auto* data = parts[index].data() + offset;
  const auto size = parts[index].size() - offset;
  auto written = std::make_shared<std::size_t>(0);
  drive(
    [this, data, size, written] { return SSL_write_ex(m_ssl, data, size, written.get()); },
    [this, parts = std::move(parts), index, offset, written, handler = std::move(handler)](int ret, int err) mutable {
      if (ret != 1) {
        handler(failure(err, "send failed"));
        return;
      }
      m_written += *written;
      write_next(std::move(parts), index, offset + *written, std::move(handler));
    });
}

void
TlsStream::close() noexcept
{
  std::error_code ec;
  m_socket.shutdown(asio::ip::tcp::socket::shutdown_both, ec);
  m_socket.close(ec);
}

void
TlsStream::close_gracefully(double linger) noexcept
{
  if (!m_socket.is_open()) {
    return;
  }
  // The socket moves to an object kept alive by its own pending operations; the SSL object does
  // not own the descriptor.
  struct Lingering
  {
    asio::ip::tcp::socket socket;
    asio::steady_timer timer;
    std::array<char, 4096> scratch{};
    static void drain(const std::shared_ptr<Lingering>& l)
    {
      l->socket.async_read_some(asio::buffer(l->scratch), [l](const std::error_code& ec, std::size_t) {
        if (ec) {
          l->timer.cancel();
          std::error_code ignored;
          l->socket.close(ignored);
          return;
        }
        drain(l);
      });
    }
  };
  std::error_code ec;
  m_socket.cancel(ec); // this stream's pending operations complete now, with an error
  m_socket.shutdown(asio::ip::tcp::socket::shutdown_send, ec);
  if (ec) {
    close();
    return;
  }
  try {
    auto executor = m_socket.get_executor();
    auto l = std::make_shared<Lingering>(Lingering{std::move(m_socket), asio::steady_timer(executor), {}});
    l->timer.expires_after(
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(linger)));
    l->timer.async_wait([l](const std::error_code& error) {
      if (!error) {
        std::error_code ignored;
        l->socket.close(ignored);
      }
    });
    Lingering::drain(l);
  } catch (const std::exception&) {
    close();
  }
}

Cert
TlsStream::peer_certificate() const
{
  return Cert(SSL_get1_peer_certificate(m_ssl));
}

std::string
TlsStream::verify_failure() const
{
  const long code = SSL_get_verify_result(m_ssl);
  if (code == X509_V_OK) {
    return {};
  }
  return describe_verify_error(code);
}

std::string
HostPort::to_string() const
{
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
}

HostPort
parse_host_port(const std::string& text, const std::string& what)
{
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    throw UsageError("{} '{}' is not HOST:PORT (for example 0.0.0.0:7443 or coordinator.example.org:7443)", what, text);
  }
  HostPort hp;
  hp.host = text.substr(0, colon);
  if (hp.host.size() >= 2 && hp.host.front() == '[' && hp.host.back() == ']') {
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  unsigned port = 0;
  const auto* first = text.data() + colon + 1;
  const auto* last = text.data() + text.size();
  const auto [p, ec] = std::from_chars(first, last, port);
  if (ec != std::errc{} || p != last || port > 65535) {
    throw UsageError("{} '{}': the port must be a number from 0 to 65535", what, text);
  }
  hp.port = static_cast<std::uint16_t>(port);
  return hp;
}

void
listen_on(asio::ip::tcp::acceptor& acceptor, const HostPort& where, const char* what)
{
  using tcp = asio::ip::tcp;
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
}

} // namespace fedl::core
