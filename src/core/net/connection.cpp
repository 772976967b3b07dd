// SPDX-License-Identifier: Apache-2.0
#include "core/net/connection.hpp"

#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <cerrno>
#include <cstring>
#include <unistd.h>

namespace fedl::core {

namespace {
constexpr std::size_t chunk_size = 256 * 1024;
constexpr double linger_seconds = 2; // for the peer to read a TLS alert or an error frame before the reset
}

double
FramedConnection::now() noexcept
{
  return steady_seconds();
}

FramedConnection::FramedConnection(std::unique_ptr<TlsStream> stream, FrameLimits limits, Callbacks callbacks)
  : m_stream(std::move(stream)), m_limits(limits), m_cb(std::move(callbacks))
{
  m_last_rx = m_last_tx = now();
}

void
FramedConnection::start()
{
  m_stream->async_handshake([self = shared_from_this()](const TlsResult& r) {
    if (self->m_closed) {
      return;
    }
    if (!r) {
      auto reason = r.error;
      if (const auto why = self->m_stream->verify_failure(); !why.empty()) {
        reason = fmt::format("certificate refused: {}", why);
      }
      self->shut(reason, true);
      return;
    }
    self->m_ready = true;
    self->m_last_rx = now();
    if (self->m_cb.on_ready) {
      self->m_cb.on_ready();
    }
    if (!self->m_closed) {
      self->read_prefix();
      self->write_next();
    }
  });
}

void
FramedConnection::read_exact(std::byte* out, std::size_t size, std::function<void()> then)
{
  if (size == 0) {
    then();
    return;
  }
  m_stream->async_read_some(
    out, size,
    [self = shared_from_this(), out, size, then = std::move(then)](const TlsResult& r, std::size_t got) mutable {
      if (self->m_closed) {
        return;
      }
      if (!r) {
        self->close(r.closed ? "the peer closed the connection" : r.error);
        return;
      }
      self->m_last_rx = now();
      self->m_bytes_in += got;
      self->read_exact(out + got, size - got, std::move(then));
    });
}

void
FramedConnection::read_prefix()
{
  read_exact(m_prefix_bytes.data(), m_prefix_bytes.size(), [this] {
    try {
      m_prefix = decode_prefix(m_prefix_bytes, m_limits);
    } catch (const ProtocolError& e) {
      send_error_and_close(fmt::format("protocol error: {}", e.what()), 1);
      return;
    }
    m_header_text.assign(m_prefix.header_size, '\0');
    read_exact(reinterpret_cast<std::byte*>(m_header_text.data()), m_header_text.size(), [this] {
      try {
        m_header = decode_header(m_header_text);
      } catch (const ProtocolError& e) {
        send_error_and_close(fmt::format("protocol error: {}", e.what()), 1);
        return;
      }
      m_sink = {};
      if (m_prefix.body_size > 0 && m_cb.on_head) {
        try {
          m_sink = m_cb.on_head(m_prefix, m_header);
        } catch (const nlohmann::json::exception& e) {
          bad_header(e);
          return;
        } catch (const ProtocolError& e) {
          bad_header(e);
          return;
        }
        if (m_closed) {
          return;
        }
      }
      if (m_sink.memory) {
        m_sink.memory->clear();
        read_memory_body();
      } else {
        read_body(m_prefix.body_size);
      }
    });
  });
}

// A body that goes to memory: the buffer grows with the bytes that arrive (doubling, from 1 MiB),
// never to the size the peer claims before it has sent it.
void
FramedConnection::read_memory_body()
{
  auto& buf = *m_sink.memory;
  const auto have = buf.size();
  if (have == m_prefix.body_size) {
    frame_done();
    return;
  }
  const auto want =
    std::min<std::uint64_t>(m_prefix.body_size, std::max<std::uint64_t>(2 * have, std::uint64_t{1} << 20));
  buf.resize(want);
  read_exact(buf.data() + have, want - have, [this] { read_memory_body(); });
}

// A body that goes to a file or nowhere, through a fixed-size buffer.
void
FramedConnection::read_body(std::uint64_t remaining)
{
  if (remaining == 0) {
    frame_done();
    return;
  }
  if (m_chunk.empty()) {
    m_chunk.resize(chunk_size);
  }
  const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(remaining, m_chunk.size()));
  m_stream->async_read_some(
    m_chunk.data(), n, [self = shared_from_this(), remaining](const TlsResult& r, std::size_t got) {
      if (self->m_closed) {
        return;
      }
      if (!r) {
        self->close(r.closed ? "the peer closed the connection inside a frame" : r.error);
        return;
      }
      self->m_last_rx = now();
      self->m_bytes_in += got;
      if (self->m_sink.fd >= 0) {
        std::size_t done = 0;
        while (done < got) {
          const auto w = ::write(self->m_sink.fd, self->m_chunk.data() + done, got - done);
          if (w < 0 && errno == EINTR) {
            continue;
          }
          if (w < 0) {
            // A full disk is the coordinator's problem, not the peer's; the owner sees the short file.
            self->close(fmt::format("cannot store the incoming {} body: {}", frame_type_name(self->m_prefix.type),
                                    std::strerror(errno)));
            return;
          }
          done += static_cast<std::size_t>(w);
        }
        if (self->m_sink.on_bytes) {
          self->m_sink.on_bytes(std::span(self->m_chunk).first(got));
        }
      }
      self->read_body(remaining - got);
    });
}

void
FramedConnection::frame_done()
{
  // After an error frame is queued, what the peer still sends is read and ignored.
  if (m_cb.on_frame && m_closing_since == 0) {
    try {
      m_cb.on_frame(m_prefix.type, m_header, m_sink);
    } catch (const nlohmann::json::exception& e) {
      m_sink = {};
      bad_header(e);
      return;
    } catch (const ProtocolError& e) {
      m_sink = {};
      bad_header(e);
      return;
    }
  }
  m_sink = {};
  if (!m_closed) {
    read_prefix();
  }
}

// A header field of the wrong type (a string for a number...), met by the owner's callback
// (nlohmann's type error, or a ProtocolError from header_uint and the like).
void
FramedConnection::bad_header(const std::exception& e)
{
  send_error_and_close(fmt::format("protocol error: bad {} frame header: {}", frame_type_name(m_prefix.type), e.what()),
                       1);
}

void
FramedConnection::send(FrameType type, const nlohmann::json& header, std::vector<std::span<const std::byte>> body,
                       std::shared_ptr<const void> keep)
{
  if (m_closed) {
    return;
  }
  std::uint64_t size = 0;
  for (const auto& p : body) {
    size += p.size();
  }
  m_queue.push_back({frame_head(type, header, size), std::move(body), std::move(keep)});
  write_next();
}

void
FramedConnection::write_next()
{
  if (m_writing || m_closed || !m_ready || m_queue.empty()) {
    if (!m_writing && m_queue.empty() && m_close_when_sent && !m_closed) {
      shut("closed after an error frame", true);
    }
    return;
  }
  m_writing = true;
  auto& out = m_queue.front();
  std::vector<std::span<const std::byte>> parts;
  parts.reserve(out.body.size() + 1);
  parts.push_back(as_bytes(out.head));
  parts.insert(parts.end(), out.body.begin(), out.body.end());
  std::uint64_t total = 0;
  for (const auto& p : parts) {
    total += p.size();
  }
  m_stream->async_write(std::move(parts), [self = shared_from_this(), total](const TlsResult& r) {
    self->m_writing = false;
    if (self->m_closed) {
      return;
    }
    if (!r) {
      self->close(r.error);
      return;
    }
    self->m_bytes_out += total;
    self->m_last_tx = now();
    self->m_queue.pop_front();
    self->write_next();
  });
}

void
FramedConnection::send_error_and_close(const std::string& message, int code, nlohmann::json extra)
{
  if (m_closed) {
    return;
  }
  m_close_reason = message;
  m_closing_since = now();
  extra["message"] = message;
  extra["code"] = code;
  send(FrameType::error, extra);
  m_close_when_sent = true;
  write_next();
}

void
FramedConnection::close(const std::string& reason)
{
  shut(reason, false);
}

void
FramedConnection::shut(const std::string& reason, bool linger)
{
  if (m_closed) {
    return;
  }
  m_closed = true;
  if (linger) {
    m_stream->close_gracefully(linger_seconds);
  } else {
    m_stream->close();
  }
  m_queue.clear();
  if (m_cb.on_close) {
    m_cb.on_close(m_close_reason.empty() ? reason : m_close_reason);
  }
}

} // namespace fedl::core
