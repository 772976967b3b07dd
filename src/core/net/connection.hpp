// SPDX-License-Identifier: Apache-2.0
// A TLS connection that carries fedl frames (core/net/frame.hpp): a read loop that checks every
// prefix against limits before it reads further and puts each body where its owner says (a
// buffer, a file, or nowhere), and a write queue whose bodies are sent from the owner's memory
// (a mapped model file, for instance) without being copied. Used by the coordinator and the site;
// single-threaded like the io_context that runs it.
#pragma once

#include "core/net/frame.hpp"
#include "core/net/tls.hpp"

#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace fedl::core {

class FramedConnection : public std::enable_shared_from_this<FramedConnection>
{
public:
  // Where a frame's body goes: `memory` (resized to the body size), the file descriptor `fd`
  // (written as it arrives), or nowhere (read and dropped) when both are empty. `on_bytes` sees
  // each piece of a body going to `fd` once it is written (to hash it while it is in cache).
  struct BodySink
  {
    std::shared_ptr<std::vector<std::byte>> memory;
    int fd = -1;
    std::function<void(std::span<const std::byte>)> on_bytes{};
  };
  struct Callbacks
  {
    // The handshake is done (the peer's certificate is available).
    std::function<void()> on_ready;
    // A frame's prefix and header arrived; says where its body goes (called only if it has one).
    std::function<BodySink(const FramePrefix&, const nlohmann::json&)> on_head;
    // A whole frame arrived (its body, if any, is in the sink on_head returned).
    std::function<void(FrameType, nlohmann::json&, const BodySink&)> on_frame;
    // The connection is closed; `reason` says why (for the log). Called once.
    std::function<void(const std::string& reason)> on_close;
  };

  FramedConnection(std::unique_ptr<TlsStream> stream, FrameLimits limits, Callbacks callbacks);

  // Runs the handshake, then reads frames until the connection closes.
  void start();
  // Queues a frame; `body` must stay valid until it is sent, which `keep` can ensure.
  void send(FrameType type, const nlohmann::json& header, std::vector<std::span<const std::byte>> body = {},
            std::shared_ptr<const void> keep = {});
  // Sends an error frame, then closes once it has gone (or at once if the peer does not read).
  // `extra` adds fields to the error frame's header.
  void send_error_and_close(const std::string& message, int code, nlohmann::json extra = nlohmann::json::object());
  void close(const std::string& reason);
  // The rest of the body being received goes nowhere (its file was closed by the owner).
  void drop_body() noexcept
  {
    m_sink.fd = -1;
    m_sink.on_bytes = nullptr;
  }

  bool is_open() const noexcept { return !m_closed; }
  bool ready() const noexcept { return m_ready; }
  TlsStream& stream() noexcept { return *m_stream; }
  // Seconds (steady clock) of the last byte received and the last frame sent.
  double last_received() const noexcept { return m_last_rx; }
  double last_sent() const noexcept { return m_last_tx; }
  std::size_t queued() const noexcept { return m_queue.size(); }
  // When an error frame was queued to end this connection (0: not closing). The owner forces the
  // close if the peer does not take it in time.
  double closing_since() const noexcept { return m_closing_since; }
  std::uint64_t bytes_in() const noexcept { return m_bytes_in; }
  std::uint64_t bytes_out() const noexcept { return m_bytes_out; }

  static double now() noexcept;

private:
  struct Outgoing
  {
    std::string head;
    std::vector<std::span<const std::byte>> body;
    std::shared_ptr<const void> keep;
  };

  // Closes; with `linger`, after what was sent last has reached the peer (TlsStream::close_gracefully).
  void shut(const std::string& reason, bool linger);
  void read_prefix();
  void read_exact(std::byte* out, std::size_t size, std::function<void()> then);
  void read_body(std::uint64_t remaining);
  void read_memory_body();
  void frame_done();
  void bad_header(const std::exception& e);
  void write_next();

  std::unique_ptr<TlsStream> m_stream;
  FrameLimits m_limits;
  Callbacks m_cb;
  bool m_closed = false;
  bool m_ready = false;
  bool m_writing = false;
  bool m_close_when_sent = false;
  std::string m_close_reason; // set by send_error_and_close: what the log says when it closes
  double m_closing_since = 0; // when send_error_and_close was called
  double m_last_rx = 0;
  double m_last_tx = 0;
  std::uint64_t m_bytes_in = 0;
  std::uint64_t m_bytes_out = 0;
  std::deque<Outgoing> m_queue;

  std::array<std::byte, frame_prefix_size> m_prefix_bytes{};
  FramePrefix m_prefix;
  std::string m_header_text;
  nlohmann::json m_header;
  BodySink m_sink;
  std::vector<std::byte> m_chunk;
};

} // namespace fedl::core
