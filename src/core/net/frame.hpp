// SPDX-License-Identifier: Apache-2.0
// fedl's message framing (DESIGN §4), used on the TLS connection between coordinator and site
// and on the pipes between a process and its trainer or evaluator child.
//
// A frame is a 20-byte prefix, a JSON header and a binary body:
//
//   offset 0   4 bytes  magic "FEDL"
//          4   1 byte   protocol version (1)
//          5   1 byte   frame type (FrameType)
//          6   2 bytes  flags, zero in version 1
//          8   4 bytes  header length, little-endian (UTF-8 JSON object, at most 64 KiB)
//         12   8 bytes  body length, little-endian
//         20            header, then body
//
// A receiver checks the prefix (magic, version, type, flags, both lengths against its limits)
// before it allocates anything for the header or the body, so a claimed size never costs memory.
#pragma once

#include "core/sandbox/sandbox.hpp"
#include "core/trust/model_policy.hpp"

#include <nlohmann/json.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

inline constexpr std::uint8_t protocol_version = 1;
inline constexpr std::size_t frame_prefix_size = 20;
inline constexpr std::uint32_t max_frame_header = 64 * 1024;
inline constexpr std::size_t max_header_nesting = 8; // arrays and objects within a header

// Each type's header: site_protocol.hpp (serve <-> join), trainer_protocol.hpp (the trainer child).
enum class FrameType : std::uint8_t
{
  hello = 1,     // site -> coordinator: {"site", "version", "round"}; no body
  welcome = 2,   // coordinator -> site: {"federation", "round", "rounds", "heartbeat"}; no body
  task = 3,      // train: {"round", "attempt", "deadline", "training", "base_sha256"}; body: the model
  update = 4,    // {"round", "attempt", "num_samples", "metrics"}; body: the update (safetensors)
  heartbeat = 5, // either way, no body; keeps an idle connection known to be alive
  done = 6,      // coordinator -> site: the federation is finished {"rounds", "reason"}
  error = 7,     // {"message", "code"}: the sender closes the connection after it; from a site with
                 // a "task" field it reports a failed task and the connection stays
  eval = 8,      // evaluator pipe: {}; body: the model
  result = 9,    // evaluator pipe: {"accuracy", "loss", "samples"}
  // Secure aggregation's stages (net/secagg_protocol.hpp):
  secagg_keys = 10,      // site -> coordinator: SecAggKeys
  secagg_peers = 11,     // coordinator -> site: SecAggPeers
  secagg_shares = 12,    // both ways: SecAggShares
  secagg_input = 13,     // site -> coordinator: SecAggInput; body: the masked words
  secagg_unmask = 14,    // coordinator -> site: SecAggUnmask
  secagg_reveal = 15,    // site -> coordinator: SecAggReveal
  secagg_signature = 16, // site -> coordinator: SecAggSignature (its signature over the survivors)
};
inline constexpr std::uint8_t max_frame_type = 16;

// "hello", "task", ...
std::string_view frame_type_name(FrameType type) noexcept;

// A peer broke the protocol: bad magic, version or type, a size over a limit, bad JSON, a frame
// it must not send. The connection (or pipe) is closed; the message says why, for the log.
class ProtocolError : public std::runtime_error
{
public:
  using std::runtime_error::runtime_error;
};

struct FramePrefix
{
  FrameType type = FrameType::heartbeat;
  std::uint32_t header_size = 0;
  std::uint64_t body_size = 0;
};

// What a receiver accepts: the largest body per frame type (0: no body; a type that is absent
// from `allowed` is refused outright).
struct FrameLimits
{
  std::array<std::uint64_t, max_frame_type + 1> max_body{};
  std::array<bool, max_frame_type + 1> allowed{};

  FrameLimits& allow(FrameType type, std::uint64_t body_limit = 0)
  {
    allowed[static_cast<std::size_t>(type)] = true;
    max_body[static_cast<std::size_t>(type)] = body_limit;
    return *this;
  }
};

std::array<std::byte, frame_prefix_size> encode_prefix(FrameType type, std::uint32_t header_size,
                                                       std::uint64_t body_size);
// Throws ProtocolError saying what is wrong.
FramePrefix decode_prefix(std::span<const std::byte, frame_prefix_size> bytes, const FrameLimits& limits);
// Parses a frame header; throws ProtocolError unless it is a JSON object nested at most
// max_header_nesting deep.
nlohmann::json decode_header(std::string_view text);

// Typed fields of a peer's header: the value of `key`, or `fallback` if it is absent. Throws
// ProtocolError naming the field if it has another type or a value outside the type's range; a
// float is not an integer here (nlohmann's value() converts one with a cast that is undefined
// past the range). header_number accepts any finite number.
std::uint64_t header_uint(const nlohmann::json& header, const char* key, std::uint64_t fallback = 0);
std::int64_t header_int(const nlohmann::json& header, const char* key, std::int64_t fallback);
double header_number(const nlohmann::json& header, const char* key, double fallback);
std::string header_string(const nlohmann::json& header, const char* key, const std::string& fallback = {});
bool header_bool(const nlohmann::json& header, const char* key, bool fallback = false);
// A sandbox level (off, auto, strict), if the field is there.
std::optional<SandboxLevel> header_sandbox(const nlohmann::json& header, const char* key);
// A site's TorchScript policy (strict, inspect, pinned: fedl-join(1) --model-policy), if the field
// is there.
std::optional<ModelPolicy> header_model_policy(const nlohmann::json& header, const char* key);

// The prefix and header of a frame, ready to be followed by `body_size` body bytes.
std::string frame_head(FrameType type, const nlohmann::json& header, std::uint64_t body_size);

// A whole frame read from a pipe.
struct Frame
{
  FrameType type = FrameType::heartbeat;
  nlohmann::json header;
  std::vector<std::byte> body;
};

// Blocking frame I/O on a file descriptor (a pipe), retrying on EINTR. write_frame throws Error on
// a write failure (EPIPE included: the peer is gone). read_frame returns nullopt on end of file
// at a frame boundary, throws ProtocolError for a bad frame or end of file inside one; the body
// goes into `reuse` (an earlier frame's, say), whose pages are then not faulted in afresh.
void write_frame(int fd, FrameType type, const nlohmann::json& header,
                 std::span<const std::span<const std::byte>> body = {});
std::optional<Frame> read_frame(int fd, const FrameLimits& limits, std::vector<std::byte> reuse = {});

} // namespace fedl::core
