// SPDX-License-Identifier: Apache-2.0
#include "core/net/frame.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <doctest/doctest.h>

#include <array>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <unistd.h>

using namespace fedl::core;

namespace {

// A pipe whose ends close with the test.
struct Pipe
{
  int fds[2] = {-1, -1};
  Pipe() { REQUIRE(::pipe2(fds, O_CLOEXEC) == 0); }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  ~Pipe()
  {
    close_read();
    close_write();
  }
  int read_end() const { return fds[0]; }
  int write_end() const { return fds[1]; }
  void close_read()
  {
    if (fds[0] >= 0) {
      ::close(fds[0]);
      fds[0] = -1;
    }
  }
  void close_write()
  {
    if (fds[1] >= 0) {
      ::close(fds[1]);
      fds[1] = -1;
    }
  }
  void write_raw(std::string_view bytes) const
  {
    REQUIRE(::write(fds[1], bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  }
};

FrameLimits
task_limits(std::uint64_t body = 1 << 20)
{
  FrameLimits limits;
  limits.allow(FrameType::task, body).allow(FrameType::heartbeat);
  return limits;
}

std::string
text_of(std::span<const std::byte> bytes)
{
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// The prefix with byte `at` replaced by `value`.
std::array<std::byte, frame_prefix_size>
patched(std::array<std::byte, frame_prefix_size> prefix, std::size_t at, unsigned value)
{
  prefix[at] = static_cast<std::byte>(value);
  return prefix;
}

std::string
protocol_error(const std::array<std::byte, frame_prefix_size>& prefix, const FrameLimits& limits)
{
  try {
    (void)decode_prefix(prefix, limits);
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "no error";
}

} // namespace

TEST_SUITE_BEGIN("core");

TEST_CASE("core::frame prefix: encode and decode round trip, little-endian at fixed offsets")
{
  const auto prefix = encode_prefix(FrameType::task, 0x01020304, 0x0000'0506'0708'090aULL);
  CHECK(text_of(std::span(prefix).first(4)) == "FEDL");
  CHECK(static_cast<unsigned>(prefix[4]) == protocol_version);
  CHECK(static_cast<unsigned>(prefix[5]) == 3);
  CHECK(static_cast<unsigned>(prefix[6]) == 0);
  CHECK(static_cast<unsigned>(prefix[7]) == 0);
  CHECK(static_cast<unsigned>(prefix[8]) == 0x04);
  CHECK(static_cast<unsigned>(prefix[11]) == 0x01);
  CHECK(static_cast<unsigned>(prefix[12]) == 0x0a);
  CHECK(static_cast<unsigned>(prefix[17]) == 0x05);

  const auto small = encode_prefix(FrameType::task, 1000, 123456);
  const auto p = decode_prefix(small, task_limits());
  CHECK(p.type == FrameType::task);
  CHECK(p.header_size == 1000);
  CHECK(p.body_size == 123456);

  const auto head = frame_head(FrameType::heartbeat, {{"round", 3}}, 0);
  const auto hp = decode_prefix(
    std::span<const std::byte, frame_prefix_size>(as_bytes(head).first<frame_prefix_size>()), task_limits());
  CHECK(hp.type == FrameType::heartbeat);
  CHECK(hp.header_size == head.size() - frame_prefix_size);
  CHECK(decode_header(std::string_view(head).substr(frame_prefix_size)) == nlohmann::json{{"round", 3}});
  CHECK(frame_type_name(FrameType::result) == "result");
}

TEST_CASE("core::decode_prefix refuses bad magic, version, type, flags and sizes")
{
  const auto good = encode_prefix(FrameType::task, 10, 10);
  CHECK(protocol_error(patched(good, 0, 'X'), task_limits()).find("bad magic") != std::string::npos);
  CHECK(protocol_error(patched(good, 4, 2), task_limits()).find("protocol version 2 is not supported") !=
        std::string::npos);
  CHECK(protocol_error(patched(good, 5, 0), task_limits()).find("unknown frame type 0") != std::string::npos);
  CHECK(protocol_error(patched(good, 5, max_frame_type + 1), task_limits()).find("unknown frame type 17") !=
        std::string::npos);
  // Secure aggregation's types are known, and refused by a receiver that does not take them.
  CHECK(protocol_error(patched(good, 5, static_cast<unsigned>(FrameType::secagg_input)), task_limits())
          .find("unexpected secagg_input frame") != std::string::npos);
  CHECK(protocol_error(patched(good, 7, 1), task_limits()).find("flags") != std::string::npos);
  // A known type that this receiver does not take.
  CHECK(protocol_error(encode_prefix(FrameType::hello, 10, 0), task_limits()) == "unexpected hello frame");
  CHECK(protocol_error(encode_prefix(FrameType::task, max_frame_header + 1, 0), task_limits()) ==
        "task frame header of 65537 bytes is over the limit of 65536");
  CHECK(protocol_error(encode_prefix(FrameType::task, max_frame_header, 0), task_limits()) == "no error");
  CHECK(protocol_error(encode_prefix(FrameType::task, 10, std::uint64_t{1} << 40), task_limits()) ==
        "task frame body of 1099511627776 bytes is over the limit of 1048576");
  CHECK(protocol_error(encode_prefix(FrameType::task, 10, 1 << 20), task_limits()) == "no error");
  // A type allowed without a body.
  CHECK(protocol_error(encode_prefix(FrameType::heartbeat, 2, 1), task_limits()).find("body of 1 bytes") !=
        std::string::npos);
}

TEST_CASE("core::decode_header takes JSON objects only")
{
  CHECK(decode_header("") == nlohmann::json::object());
  CHECK(decode_header(R"({"a": [1, 2]})")["a"][1] == 2);
  CHECK_THROWS_AS(decode_header("[1, 2]"), ProtocolError);
  CHECK_THROWS_AS(decode_header("{\"a\": "), ProtocolError);
  CHECK_THROWS_AS(decode_header("\"text\""), ProtocolError);
  CHECK_THROWS_AS(frame_head(FrameType::task, {{"x", std::string(max_frame_header, 'a')}}, 0), Error);
}

TEST_CASE("core::write_frame and read_frame over a pipe: frames, body parts, end of file")
{
  Pipe pipe;
  const std::string a = "first part,";
  const std::string b = "second part";
  const std::array<std::span<const std::byte>, 2> parts{as_bytes(a), as_bytes(b)};
  write_frame(pipe.write_end(), FrameType::task, {{"round", 1}, {"training", {{"lr", 0.5}}}}, parts);
  write_frame(pipe.write_end(), FrameType::heartbeat, nlohmann::json::object());
  pipe.close_write();

  auto f = read_frame(pipe.read_end(), task_limits());
  REQUIRE(f);
  CHECK(f->type == FrameType::task);
  CHECK(f->header["round"] == 1);
  CHECK(f->header["training"]["lr"] == 0.5);
  CHECK(text_of(f->body) == a + b);
  f = read_frame(pipe.read_end(), task_limits());
  REQUIRE(f);
  CHECK(f->type == FrameType::heartbeat);
  CHECK(f->header == nlohmann::json::object());
  CHECK(f->body.empty());
  // End of file at a frame boundary is the peer's clean goodbye.
  CHECK_FALSE(read_frame(pipe.read_end(), task_limits()));
}

TEST_CASE("core::read_frame refuses a frame cut short, and a huge claimed body before allocating it")
{
  const auto whole = frame_head(FrameType::task, {{"round", 1}}, 8) + "12345678";
  const auto head_end = whole.size() - 8;
  struct Cut
  {
    std::size_t at;
    const char* message;
  };
  for (const auto& cut : {Cut{7, "the pipe closed inside a frame prefix"}, Cut{frame_prefix_size + 2, "header"},
                          Cut{head_end + 3, "the pipe closed inside a frame body"}}) {
    CAPTURE(cut.at);
    Pipe pipe;
    pipe.write_raw(std::string_view(whole).substr(0, cut.at));
    pipe.close_write();
    try {
      (void)read_frame(pipe.read_end(), task_limits());
      FAIL("no error");
    } catch (const ProtocolError& e) {
      CHECK(std::string(e.what()).find(cut.message) != std::string::npos);
    }
  }

  // 2^40 bytes claimed: refused from the prefix alone (an allocation would throw bad_alloc).
  Pipe pipe;
  const auto prefix = encode_prefix(FrameType::task, 2, std::uint64_t{1} << 40);
  pipe.write_raw(text_of(prefix) + "{}");
  try {
    (void)read_frame(pipe.read_end(), task_limits(std::uint64_t{1} << 30));
    FAIL("no error");
  } catch (const ProtocolError& e) {
    CHECK(std::string(e.what()) == "task frame body of 1099511627776 bytes is over the limit of 1073741824");
  }

  Pipe bad_header;
  bad_header.write_raw(text_of(encode_prefix(FrameType::task, 3, 0)) + "[1]");
  CHECK_THROWS_WITH_AS((void)read_frame(bad_header.read_end(), task_limits()), "frame header is not a JSON object",
                       ProtocolError);
}

TEST_CASE("core::write_frame to a pipe nobody reads throws Error")
{
  Pipe pipe;
  pipe.close_read();
  auto* old = std::signal(SIGPIPE, SIG_IGN);
  CHECK_THROWS_AS(write_frame(pipe.write_end(), FrameType::heartbeat, {}), Error);
  std::signal(SIGPIPE, old);
}

TEST_SUITE_END();

TEST_CASE("frame: typed header fields refuse floats past the range instead of converting them")
{
  const auto h = nlohmann::json::parse(R"({"task": 7, "big": 1e300, "neg": -1, "text": "1", "half": 0.5,
                                           "code": 4, "huge": 18446744073709551615, "x": 2.5})");
  CHECK(header_uint(h, "task") == 7);
  CHECK(header_uint(h, "absent", 9) == 9);
  CHECK(header_uint(h, "huge") == 18446744073709551615ULL);
  for (const char* key : {"big", "neg", "text", "half"}) {
    CHECK_THROWS_AS(header_uint(h, key), ProtocolError);
  }
  CHECK(header_int(h, "code", 1) == 4);
  CHECK(header_int(h, "neg", 1) == -1);
  CHECK_THROWS_AS(header_int(h, "huge", 1), ProtocolError);
  CHECK_THROWS_AS(header_int(h, "big", 1), ProtocolError);
  CHECK(header_number(h, "x", 0) == 2.5);
  CHECK(header_number(h, "task", 0) == 7);
  CHECK_THROWS_AS(header_number(h, "text", 0), ProtocolError);
}
