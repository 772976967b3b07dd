// SPDX-License-Identifier: Apache-2.0
// Fuzz target "frame": the frame prefix and header decoders (core/net/frame.hpp) as the coordinator,
// a site and a child pipe use them. The input is a byte stream off the wire: it is decoded
// prefix + header under the coordinator's and the site's limits, then read as a sequence of
// whole frames from a pipe with read_frame.
#include "fuzz.hpp"

#include "core/net/frame.hpp"
#include "core/util/error.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

using namespace fedl;
using core::FrameType;

namespace {

// What the coordinator accepts from a site (coordinator.cpp) and a site from the coordinator
// (session.cpp); body limits small enough that a claimed size never matters to the fuzzer.
const core::FrameLimits&
coordinator_limits()
{
  static const auto l = core::FrameLimits{}
                          .allow(FrameType::hello)
                          .allow(FrameType::heartbeat)
                          .allow(FrameType::error)
                          .allow(FrameType::update, 1 << 16);
  return l;
}

// A pipe between a process and its child carries every type: task, eval, update, result, error.
const core::FrameLimits&
pipe_limits()
{
  static const auto l = [] {
    core::FrameLimits limits;
    for (std::uint8_t t = 1; t <= core::max_frame_type; ++t) {
      limits.allow(static_cast<FrameType>(t), 1 << 16);
    }
    return limits;
  }();
  return l;
}

const core::FrameLimits&
site_limits()
{
  static const auto l = core::FrameLimits{}
                          .allow(FrameType::welcome)
                          .allow(FrameType::task, 1 << 16)
                          .allow(FrameType::heartbeat)
                          .allow(FrameType::done)
                          .allow(FrameType::error);
  return l;
}

void
decode_one(fuzz::Bytes in, const core::FrameLimits& limits)
{
  if (in.size() < core::frame_prefix_size) {
    return;
  }
  const auto* p = reinterpret_cast<const std::byte*>(in.data());
  const std::span<const std::byte, core::frame_prefix_size> prefix(p, core::frame_prefix_size);
  core::FramePrefix fp;
  try {
    fp = core::decode_prefix(prefix, limits);
  } catch (const core::ProtocolError& e) {
    fuzz::refused(e);
    return;
  }
  FEDL_FUZZ_CHECK(limits.allowed[static_cast<std::size_t>(fp.type)]);
  FEDL_FUZZ_CHECK(fp.header_size <= core::max_frame_header);
  FEDL_FUZZ_CHECK(fp.body_size <= limits.max_body[static_cast<std::size_t>(fp.type)]);
  // A prefix that decodes is exactly what encode_prefix writes for it.
  const auto again = core::encode_prefix(fp.type, fp.header_size, fp.body_size);
  FEDL_FUZZ_CHECK(std::memcmp(again.data(), p, again.size()) == 0);

  const auto rest = in.subspan(core::frame_prefix_size);
  const auto header = fuzz::as_text(rest.first(std::min<std::size_t>(fp.header_size, rest.size())));
  try {
    const auto j = core::decode_header(header);
    FEDL_FUZZ_CHECK(j.is_object());
  } catch (const core::ProtocolError& e) {
    fuzz::refused(e);
  }
}

// The whole input through a pipe, frame after frame, as a parent reads its child.
void
read_all(fuzz::Bytes in)
{
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    std::perror("pipe2");
    std::abort();
  }
  // The whole input fits in the pipe, so that one thread can write it all before reading.
  if (in.size() > 65536 && ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(in.size())) < 0) {
    in = in.first(65536);
  }
  std::size_t done = 0;
  while (done < in.size()) {
    const auto w = ::write(fds[1], in.data() + done, in.size() - done);
    if (w <= 0) {
      std::perror("write");
      std::abort();
    }
    done += static_cast<std::size_t>(w);
  }
  ::close(fds[1]);
  try {
    for (int i = 0; i < 1000; ++i) {
      const auto f = core::read_frame(fds[0], pipe_limits());
      if (!f) {
        break;
      }
      FEDL_FUZZ_CHECK(f->header.is_object());
      FEDL_FUZZ_CHECK(f->body.size() <= pipe_limits().max_body[static_cast<std::size_t>(f->type)]);
    }
  } catch (const core::ProtocolError& e) {
    fuzz::refused(e);
  }
  ::close(fds[0]);
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  const fuzz::Bytes in(data, size);
  decode_one(in, coordinator_limits());
  decode_one(in, site_limits());
  read_all(in);
  return 0;
}
