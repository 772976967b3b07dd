// SPDX-License-Identifier: Apache-2.0
#include "core/net/frame.hpp"

#include "core/util/text.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unistd.h>

namespace fedl::core {

namespace {

constexpr std::array<char, 4> magic{'F', 'E', 'D', 'L'};

// Reads exactly `n` bytes; returns how many were read before end of file.
std::size_t
read_full(int fd, std::byte* out, std::size_t n)
{
  std::size_t done = 0;
  while (done < n) {
    const auto r = ::read(fd, out + done, n - done);
    if (r < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error("reading from the pipe failed: {}", std::strerror(errno));
    }
    if (r == 0) {
      break;
    }
    done += static_cast<std::size_t>(r);
  }
  return done;
}

void
write_full(int fd, std::span<const std::byte> bytes)
{
  std::size_t done = 0;
  while (done < bytes.size()) {
    const auto w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error("writing to the pipe failed: {}", std::strerror(errno));
    }
    done += static_cast<std::size_t>(w);
  }
}

} // namespace

std::string_view
frame_type_name(FrameType type) noexcept
{
  switch (type) {
  case FrameType::hello:
    return "hello";
  case FrameType::welcome:
    return "welcome";
  case FrameType::task:
    return "task";
  case FrameType::update:
    return "update";
  case FrameType::heartbeat:
    return "heartbeat";
  case FrameType::done:
    return "done";
  case FrameType::error:
    return "error";
  case FrameType::eval:
    return "eval";
  case FrameType::result:
    return "result";
  case FrameType::secagg_keys:
    return "secagg_keys";
  case FrameType::secagg_peers:
    return "secagg_peers";
  case FrameType::secagg_shares:
    return "secagg_shares";
  case FrameType::secagg_input:
    return "secagg_input";
  case FrameType::secagg_unmask:
    return "secagg_unmask";
  case FrameType::secagg_reveal:
    return "secagg_reveal";
  case FrameType::secagg_signature:
    return "secagg_signature";
  }
  return "unknown";
}

std::array<std::byte, frame_prefix_size>
encode_prefix(FrameType type, std::uint32_t header_size, std::uint64_t body_size)
{
  std::array<std::byte, frame_prefix_size> out{};
  std::memcpy(out.data(), magic.data(), magic.size());
  out[4] = static_cast<std::byte>(protocol_version);
  out[5] = static_cast<std::byte>(type);
  put_le(out.data() + 8, header_size, 4);
  put_le(out.data() + 12, body_size, 8);
  return out;
}

FramePrefix
decode_prefix(std::span<const std::byte, frame_prefix_size> bytes, const FrameLimits& limits)
{
  if (std::memcmp(bytes.data(), magic.data(), magic.size()) != 0) {
    throw ProtocolError("not a fedl frame (bad magic bytes): is the peer speaking fedl's protocol?");
  }
  const auto version = static_cast<unsigned>(bytes[4]);
  if (version != protocol_version) {
    throw ProtocolError(fmt::format(
      "protocol version {} is not supported (this fedl speaks {}); upgrade the older side", version, protocol_version));
  }
  const auto type = static_cast<unsigned>(bytes[5]);
  if (type == 0 || type > max_frame_type) {
    throw ProtocolError(fmt::format("unknown frame type {}", type));
  }
  if (get_le(bytes.data() + 6, 2) != 0) {
    throw ProtocolError("frame flags are set; version 1 has none");
  }
  FramePrefix p;
  p.type = static_cast<FrameType>(type);
  p.header_size = static_cast<std::uint32_t>(get_le(bytes.data() + 8, 4));
  p.body_size = get_le(bytes.data() + 12, 8);
  if (!limits.allowed[type]) {
    throw ProtocolError(fmt::format("unexpected {} frame", frame_type_name(p.type)));
  }
  if (p.header_size > max_frame_header) {
    throw ProtocolError(fmt::format("{} frame header of {} bytes is over the limit of {}", frame_type_name(p.type),
                                    p.header_size, max_frame_header));
  }
  if (p.body_size > limits.max_body[type]) {
    throw ProtocolError(fmt::format("{} frame body of {} bytes is over the limit of {}", frame_type_name(p.type),
                                    p.body_size, limits.max_body[type]));
  }
  return p;
}

nlohmann::json
decode_header(std::string_view text)
{
  if (text.empty()) {
    return nlohmann::json::object();
  }
  // fedl's own headers nest 4 deep at most; a parser handed a deeper one would build a tree of
  // tens of bytes per level before anything could refuse it.
  if (json_nesting(text) > max_header_nesting) {
    throw ProtocolError(fmt::format("frame header nests deeper than {} levels", max_header_nesting));
  }
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    throw ProtocolError("frame header is not a JSON object");
  }
  return j;
}

std::uint64_t
header_uint(const nlohmann::json& header, const char* key, std::uint64_t fallback)
{
  const auto it = header.find(key);
  if (it == header.end()) {
    return fallback;
  }
  if (!it->is_number_unsigned()) {
    throw ProtocolError(fmt::format("frame header field {} is not an unsigned integer", key));
  }
  return it->get<std::uint64_t>();
}

std::optional<SandboxLevel>
header_sandbox(const nlohmann::json& header, const char* key)
{
  if (!header.contains(key)) {
    return std::nullopt;
  }
  if (const auto level = sandbox_level_named(header_string(header, key))) {
    return level;
  }
  throw ProtocolError(fmt::format("frame header field {} is not off, auto or strict", key));
}

std::optional<ModelPolicy>
header_model_policy(const nlohmann::json& header, const char* key)
{
  if (!header.contains(key)) {
    return std::nullopt;
  }
  if (const auto policy = model_policy_named(header_string(header, key))) {
    return policy;
  }
  throw ProtocolError(fmt::format("frame header field {} is not strict, inspect or pinned", key));
}

std::int64_t
header_int(const nlohmann::json& header, const char* key, std::int64_t fallback)
{
  const auto it = header.find(key);
  if (it == header.end()) {
    return fallback;
  }
  if (it->is_number_integer() && !it->is_number_unsigned()) {
    return it->get<std::int64_t>();
  }
  if (it->is_number_unsigned() && it->get<std::uint64_t>() <= std::uint64_t{INT64_MAX}) {
    return static_cast<std::int64_t>(it->get<std::uint64_t>());
  }
  throw ProtocolError(fmt::format("frame header field {} is not a 64-bit integer", key));
}

double
header_number(const nlohmann::json& header, const char* key, double fallback)
{
  const auto it = header.find(key);
  if (it == header.end()) {
    return fallback;
  }
  if (!it->is_number() || !std::isfinite(it->get<double>())) {
    throw ProtocolError(fmt::format("frame header field {} is not a finite number", key));
  }
  return it->get<double>();
}

std::string
header_string(const nlohmann::json& header, const char* key, const std::string& fallback)
{
  const auto it = header.find(key);
  if (it == header.end()) {
    return fallback;
  }
  if (!it->is_string()) {
    throw ProtocolError(fmt::format("frame header field {} is not a string", key));
  }
  return it->get<std::string>();
}

bool
header_bool(const nlohmann::json& header, const char* key, bool fallback)
{
  const auto it = header.find(key);
  if (it == header.end()) {
    return fallback;
  }
  if (!it->is_boolean()) {
    throw ProtocolError(fmt::format("frame header field {} is not true or false", key));
  }
  return it->get<bool>();
}

std::string
frame_head(FrameType type, const nlohmann::json& header, std::uint64_t body_size)
{
  const auto text = header.dump();
  if (text.size() > max_frame_header) {
    throw Error("internal: {} frame header of {} bytes is over the limit", frame_type_name(type), text.size());
  }
  const auto prefix = encode_prefix(type, static_cast<std::uint32_t>(text.size()), body_size);
  std::string out(reinterpret_cast<const char*>(prefix.data()), prefix.size());
  out += text;
  return out;
}

void
write_frame(int fd, FrameType type, const nlohmann::json& header, std::span<const std::span<const std::byte>> body)
{
  std::uint64_t size = 0;
  for (const auto& part : body) {
    size += part.size();
  }
  const auto head = frame_head(type, header, size);
  write_full(fd, as_bytes(std::span(head.data(), head.size())));
  for (const auto& part : body) {
    write_full(fd, part);
  }
}

std::optional<Frame>
read_frame(int fd, const FrameLimits& limits, std::vector<std::byte> reuse)
{
  std::array<std::byte, frame_prefix_size> prefix{};
  const auto got = read_full(fd, prefix.data(), prefix.size());
  if (got == 0) {
    return std::nullopt;
  }
  if (got < prefix.size()) {
    throw ProtocolError("the pipe closed inside a frame prefix");
  }
  const auto p = decode_prefix(prefix, limits);
  std::string header(p.header_size, '\0');
  if (read_full(fd, reinterpret_cast<std::byte*>(header.data()), header.size()) < header.size()) {
    throw ProtocolError("the pipe closed inside a frame header");
  }
  Frame f;
  f.type = p.type;
  f.header = decode_header(header);
  // Past 32 MB glibc maps every block afresh: a body as large as a model, reused, saves faulting
  // in and zeroing its pages every round. Only what is added is zeroed; the read overwrites all.
  f.body = std::move(reuse);
  f.body.resize(p.body_size);
  if (read_full(fd, f.body.data(), f.body.size()) < f.body.size()) {
    throw ProtocolError("the pipe closed inside a frame body");
  }
  return f;
}

} // namespace fedl::core
