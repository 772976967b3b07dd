// SPDX-License-Identifier: Apache-2.0
// Secure aggregation on the wire (issue 13): the headers of the frames that carry SecAgg+'s
// messages (secagg/protocol.hpp) between `fedl join` and `fedl serve`, each with its encoder and
// decoder. Binary values travel as lowercase hex. fedl serve and fedl join send them under
// --secure-aggregation.
//
//   site                                         coordinator
//                                         <-     TASK with "secure_aggregation": SecAggSetup
//   SECAGG_KEYS     SecAggKeys            ->
//                                         <-     SECAGG_PEERS   SecAggPeers (neighbours' adverts
//                                                               and certificates)
//   SECAGG_SHARES   SecAggShares (to each) ->
//                                         <-     SECAGG_SHARES  SecAggShares (from each)
//   SECAGG_INPUT    SecAggInput, body: the masked words (little-endian), or a complaint ->
//                                         <-     SECAGG_UNMASK  SecAggUnmask (the survivors)
//   SECAGG_SIGNATURE SecAggSignature (over the survivors) ->
//                                         <-     SECAGG_UNMASK  SecAggUnmask (the survivors and
//                                                               their signatures)
//   SECAGG_REVEAL   SecAggReveal          ->
//
// Decoding checks every count against what the receiver allows (the sites of the attempt) and
// every size exactly, before it allocates: a violation is a ProtocolError, and the receiver drops
// the sender from the attempt (or, for the coordinator's frames, the site leaves the attempt).
#pragma once

#include "core/config/config.hpp"
#include "core/net/frame.hpp"
#include "core/secagg/encoding.hpp"
#include "core/secagg/protocol.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace fedl::core {

// The most sites one secure aggregation attempt may have (the coordinator asks no more).
inline constexpr std::size_t secagg_max_sites = SecureAggregationConfig::max_sites;

// What a site needs to take part in one attempt, sent with its task.
struct SecAggSetup
{
  std::vector<std::string> sites; // index i + 1 is sites[i]
  std::uint32_t index = 0;        // the receiving site's
  std::uint64_t threshold = 0;
  std::uint64_t neighbours = 0;
  std::uint64_t graph_seed = 0;
  std::uint64_t length = 0;      // words: the model's values and the weight
  double range = 1.0;            // the encoding's R
  std::uint64_t max_samples = 1; // the encoding's sample cap
  // Client-level DP: the site clips its update to this L2 norm before it encodes it (the
  // coordinator cannot clip what it cannot see).
  std::optional<double> clip_norm;
  // Distributed DP: the standard deviation of the noise the site adds (Encoding::noise); 0: none.
  double noise = 0;

  nlohmann::json to_json() const;
  // ProtocolError for a malformed setup (counts past secagg_max_sites, an index out of range);
  // what the numbers mean is checked by params() and encoding().
  static SecAggSetup from_json(const nlohmann::json& j);
  // The protocol's parameters for `round` and `attempt` (UsageError if they are not valid).
  secagg::Params params(std::uint64_t round, std::uint64_t attempt) const;
  secagg::Encoding encoding() const;
};

struct SecAggKeys
{
  std::uint64_t task = 0;
  secagg::KeyAdvert advert;

  nlohmann::json to_header() const;
  static SecAggKeys from_header(const nlohmann::json& header);
};

struct SecAggPeers
{
  struct Peer
  {
    secagg::KeyAdvert advert;
    std::string certificate; // PEM: the site checks the signature with it, and it with the CA
  };
  std::uint64_t task = 0;
  std::vector<Peer> peers;

  nlohmann::json to_header() const;
  // At most `max_peers` peers (the receiver's neighbours), each certificate at most 16 KiB.
  static SecAggPeers from_header(const nlohmann::json& header, std::size_t max_peers);
};

struct SecAggShares
{
  std::uint64_t task = 0;
  std::vector<secagg::SealedShares> shares;

  nlohmann::json to_header() const;
  // At most `max_shares`, each exactly secagg::sealed_share_bytes.
  static SecAggShares from_header(const nlohmann::json& header, std::size_t max_shares);
};

// A site's masked input (the frame's body: `length` little-endian words) and what it says it did
// to its update, signed with its identity key: how many values it clipped, and the encoding. Or,
// instead, a complaint: the neighbour whose shares did not open.
struct SecAggInput
{
  std::uint64_t task = 0;
  std::optional<std::uint32_t> complaint;
  std::uint64_t clipped = 0;
  double range = 0;
  std::uint64_t max_samples = 0;
  // Client-level DP: the L2 norm the site clipped its update to before encoding it.
  std::optional<double> clip_norm;
  // Its DP-SGD report (fedl.dp's JSON text, as an update's metadata carries it), if it trained
  // with DP-SGD; at most 4 KiB.
  std::optional<std::string> dp;
  std::string signature;                   // over input_payload()
  std::optional<SandboxLevel> sandbox;     // how the site confined its trainer
  std::optional<ModelPolicy> model_policy; // what it accepts of TorchScript (--model-policy)

  nlohmann::json to_header() const;
  static SecAggInput from_header(const nlohmann::json& header);
};

// What a SecAggInput's signature covers: the attempt, the site, the SHA-256 of the masked words,
// and every field of its header but the signature.
std::vector<std::byte> secagg_input_payload(const secagg::Params& p, std::uint32_t index,
                                            const std::string& words_sha256, const SecAggInput& input);

// The survivors, first to be signed, then with the signatures to reveal shares for (and then the
// frame's body holds the signers' certificates: secagg_certificates_body).
struct SecAggUnmask
{
  std::uint64_t task = 0;
  std::vector<std::uint32_t> survivors;
  std::vector<secagg::SurvivorSignature> signatures;

  nlohmann::json to_header() const;
  static SecAggUnmask from_header(const nlohmann::json& header, std::size_t max_sites);
};

// The certificates (PEM) of sites by index, as a frame body: {"certificates": [{"index",
// "certificate"}, ...]}. Reading takes at most `max_sites` of them, each at most 16 KiB, indices distinct;
// else a ProtocolError.
std::string secagg_certificates_body(std::span<const std::pair<std::uint32_t, std::string>> certificates);
std::vector<std::pair<std::uint32_t, std::string>> secagg_certificates_from_body(std::span<const std::byte> body,
                                                                                 std::size_t max_sites);

struct SecAggSignature
{
  std::uint64_t task = 0;
  secagg::SurvivorSignature signature;

  nlohmann::json to_header() const;
  static SecAggSignature from_header(const nlohmann::json& header);
};

struct SecAggReveal
{
  std::uint64_t task = 0;
  secagg::Reveal reveal;

  nlohmann::json to_header() const;
  // At most `max_shares` shares in all, each of secagg::secret_limbs values below the field's prime.
  static SecAggReveal from_header(const nlohmann::json& header, std::size_t max_shares);
};

} // namespace fedl::core
