// SPDX-License-Identifier: Apache-2.0
// SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
// (Poly)Logarithmic Overhead", CCS 2020), the protocol without its transport: the site's side
// (Client) and the coordinator's (Server) as state machines over plain messages, so that both can
// be tested in one process and the network code only carries them.
//
// n sites with indices 1..n (Params::sites, in order) sum vectors of `length` words modulo 2^32.
// Each site has k neighbours in a random k-regular graph (neighbour_graph); it shares its secrets
// with them alone, threshold t of them. Four stages, the coordinator relaying everything:
//   0 keys     each site makes two X25519 pairs (c: to encrypt shares, s: to agree masks) and
//              signs their public halves with its identity key (KeyAdvert); the coordinator
//              sends each site its neighbours' adverts. U1: the sites that advertised.
//   1 shares   each site draws a self-mask seed b and Shamir-shares b and its s secret among its
//              neighbours in U1, each share sealed (AES-256-GCM) for its recipient under a key
//              agreed from the c pairs. U2: the sites that sent shares.
//   2 input    each site adds to its input the mask of b and, for each neighbour v in U2 (those
//              whose shares it received), + or − the mask agreed with v's s key (+ if its index
//              is the smaller), and sends the sum. U3: the sites that sent it.
//   3 agree    the coordinator names U3; each survivor signs that list with its identity key, and
//              signs no other list in this attempt (the consistency round of Bonawitz et al.,
//              CCS 2017: a coordinator that told different sites different lists could otherwise
//              gather one survivor's seed from some and its partners' keys from others).
//   4 unmask   the coordinator relays the signatures; a site that sees, over the list it signed,
//              valid signatures of a majority of the attempt's sites (and at least t) reveals, for
//              each neighbour in U2, its share of b if the neighbour is in U3 and its share of the
//              s secret if not. U4: the sites that answered. The coordinator rebuilds each
//              survivor's b and each dropped site's s secret from t shares, removes their masks,
//              and has the sum of U3's inputs and nothing else.
// A stage proceeds with at least t sites' messages; a site whose neighbours in a stage are fewer
// than t stops (its secrets could not be rebuilt).
#pragma once

#include "core/secagg/crypto.hpp"
#include "core/secagg/shamir.hpp"
#include "core/util/error.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace fedl::core::secagg {

// The neighbours of every site (0-based; each list sorted) in a k-regular graph on n sites: the
// Harary graph H(k, n) (each site joined to the k/2 nearest on either side of a ring) over a
// random order of the sites drawn from `seed`, as SecAgg+ proposes. k must be even, or n − 1
// (everyone); k ≥ n − 1 gives the complete graph. Deterministic in (n, k, seed).
std::vector<std::vector<std::uint32_t>> neighbour_graph(std::size_t n, std::size_t k, std::uint64_t seed);

// The default degree for n sites: everyone (n − 1) up to 16 sites; past that 2⌈log2 n⌉ + 2 (even,
// and below n − 1), so that a site's work grows like log n (SecAgg+, section 3).
std::size_t default_neighbours(std::size_t n);
// The default threshold for k neighbours: a majority of them, ⌊k/2⌋ + 1, at least 2.
std::size_t default_threshold(std::size_t k);

// A site's secrets (its seed and its s key) are 32 bytes: shares of them hold secret_limbs values.
inline constexpr std::size_t secret_limbs = limbs_of(32);
// A SealedShares message's bytes: from, to, a share of each secret, and AES-GCM's tag.
inline constexpr std::size_t sealed_share_bytes = 8 + 2 * secret_limbs * 8 + 16;

struct Params
{
  std::uint64_t round = 0;
  std::uint64_t attempt = 0;      // a retried round uses fresh keys: another attempt number
  std::vector<std::string> sites; // index i + 1 is sites[i]
  std::size_t threshold = 0;      // t: shares needed to rebuild a site's secrets
  std::size_t neighbours = 0;     // k (see neighbour_graph)
  std::uint64_t graph_seed = 0;
  std::size_t length = 0; // words in each site's vector

  // Throws UsageError unless 2 ≤ t ≤ min(k, n − 1), n ≥ 2, the sites are distinct and non-empty,
  // and length ≥ 1.
  void check() const;
};

struct KeyAdvert
{
  std::uint32_t index = 0;
  Bytes32 c_public{};
  Bytes32 s_public{};
  // SHA-256 of the site's self-mask seed (with a label): the coordinator checks the seed it
  // rebuilds against it, so that one wrong share cannot silently change the sum.
  Bytes32 seed_commitment{};
  std::string signature; // by the site's identity key over advert_payload()
};

// What a KeyAdvert's signature covers: the protocol, round, attempt, index, site name, keys and
// the seed commitment.
std::vector<std::byte> advert_payload(const Params& p, const KeyAdvert& a);

// One site's shares for one neighbour, sealed for it.
struct SealedShares
{
  std::uint32_t from = 0;
  std::uint32_t to = 0;
  std::vector<std::byte> sealed;
};

struct MaskedInput
{
  std::uint32_t index = 0;
  std::vector<std::uint32_t> masked;
};

// Instead of its masked input, a site says that a neighbour's shares did not open: that
// neighbour sent garbage (or the coordinator altered them), and the attempt cannot go on with it.
struct Complaint
{
  std::uint32_t index = 0;
  std::uint32_t about = 0;
};

struct UnmaskRequest
{
  std::vector<std::uint32_t> survivors; // U3
};

// A survivor's signature over the survivor list (survivors_payload).
struct SurvivorSignature
{
  std::uint32_t index = 0;
  std::string signature;
};

// What a survivor signs in stage 3: the protocol, round, attempt and the list.
std::vector<std::byte> survivors_payload(const Params& p, std::span<const std::uint32_t> survivors);

// How many sites must have signed one survivor list before a site reveals shares for it: a
// majority of the attempt's sites, and at least t. Two different lists cannot both have a
// majority of honest signatures.
std::size_t consistency_quorum(const Params& p);

struct RevealedShare
{
  std::uint32_t owner = 0; // whose secret this is a share of
  Share share;
};

struct Reveal
{
  std::uint32_t index = 0;
  std::vector<RevealedShare> seeds; // of survivors' b
  std::vector<RevealedShare> keys;  // of dropped sites' s secrets
};

using Signer = std::function<std::string(std::span<const std::byte> payload)>;
// Whether `signature` over `payload` is by the site with this index.
using Verifier =
  std::function<bool(std::uint32_t index, std::span<const std::byte> payload, std::string_view signature)>;

// Thrown by a Client that cannot go on in this attempt (too few neighbours, a request that would
// break the consistency rule, a malformed message): it stops, as a site that dropped out would.
class ProtocolAbort : public Error
{
public:
  using Error::Error;
};

class Client
{
public:
  // The site with index `index` (1-based) in `p`. Draws its key pairs and self-mask seed.
  Client(Params p, std::uint32_t index, Signer sign);

  std::uint32_t index() const noexcept { return m_index; }

  // Stage 0.
  KeyAdvert advertise() const;
  // Stage 1: from the neighbours' adverts (as the coordinator relays them), the sealed shares
  // for each of them. ProtocolAbort if an advert is not of a neighbour, is given twice, or does
  // not verify, or if fewer than t remain.
  std::vector<SealedShares> share(std::span<const KeyAdvert> adverts, const Verifier& verify);
  // Stage 2: from the shares sealed for this site, the masked input (masked in place in `input`'s
  // buffer); a Complaint if one does not open. ProtocolAbort if fewer than t neighbours sent
  // shares or `input` has another length.
  std::variant<MaskedInput, Complaint> mask(std::vector<std::uint32_t> input, std::span<const SealedShares> received);
  // Stage 3: its signature over U3. ProtocolAbort if U3 repeats a site, leaves this one out, has
  // fewer than t of its neighbours, or is not the list it already signed in this attempt.
  SurvivorSignature agree(const UnmaskRequest& request);
  // Stage 4: the shares to reveal for the U3 it signed. ProtocolAbort if `request` is another
  // list, if fewer than consistency_quorum() distinct survivors' signatures over it verify, or if
  // this site already answered in this attempt.
  Reveal unmask(const UnmaskRequest& request, std::span<const SurvivorSignature> signatures, const Verifier& verify);

private:
  Params m_p;
  std::uint32_t m_index;
  Signer m_sign;
  std::vector<std::uint32_t> m_neighbours; // 1-based
  KeyPair m_c;
  KeyPair m_s;
  Bytes32 m_seed{};
  std::map<std::uint32_t, KeyAdvert> m_adverts;       // neighbours in U1
  std::map<std::uint32_t, Share> m_seed_shares;       // neighbour → my share of its b
  std::map<std::uint32_t, Share> m_key_shares;        // neighbour → my share of its s secret
  std::set<std::uint32_t> m_masked_with;              // neighbours in U2
  bool m_sent_input = false;                          // stage 2 done (not a complaint)
  std::optional<std::vector<std::uint32_t>> m_signed; // the survivor list it signed
  bool m_answered = false;
};

// The coordinator's side. It sees adverts, sealed shares, masked inputs and reveals; never an
// input, a seed or a key but those of dropped sites' masks, which it needs.
class Server
{
public:
  explicit Server(Params p);

  const Params& params() const noexcept { return m_p; }
  std::span<const std::vector<std::uint32_t>> graph() const noexcept { return m_graph; }

  // Each stage's messages, checked (index in range, once, of the stage's set, sizes); the reason
  // if refused, for the caller to drop that site. The signature is the sites' to check.
  std::optional<std::string> add_advert(KeyAdvert a);
  // The adverts of `index`'s neighbours among U1.
  std::vector<KeyAdvert> adverts_for(std::uint32_t index) const;
  std::optional<std::string> add_shares(std::uint32_t from, std::vector<SealedShares> shares);
  // The shares sealed for `index` by sites in U2.
  std::vector<SealedShares> shares_for(std::uint32_t index) const;
  std::optional<std::string> add_masked(MaskedInput m);
  // The same from the words as bytes in `order` (a frame's body: little-endian), without a copy.
  std::optional<std::string> add_masked(std::uint32_t index, std::span<const std::byte> words, std::endian order);
  UnmaskRequest unmask_request() const;
  // Stage 3: a survivor's signature (kept to relay; the sites check it).
  std::optional<std::string> add_signature(SurvivorSignature s);
  const std::vector<SurvivorSignature>& signatures() const noexcept { return m_signatures; }
  std::optional<std::string> add_reveal(Reveal r);

  const std::set<std::uint32_t>& advertised() const noexcept { return m_u1; }
  const std::set<std::uint32_t>& shared() const noexcept { return m_u2; }
  const std::set<std::uint32_t>& survivors() const noexcept { return m_u3; }
  const std::set<std::uint32_t>& signers() const noexcept { return m_signers; } // stage 3
  const std::set<std::uint32_t>& revealed() const noexcept { return m_u4; }     // U4

  // The sum of the survivors' inputs modulo 2^32. Throws Error if a survivor's seed or a dropped
  // site's key cannot be rebuilt (fewer than t consistent shares of it); the message names the
  // sites whose shares did not agree with the others, if any.
  std::vector<std::uint32_t> unmasked_sum() const;

private:
  Params m_p;
  std::vector<std::vector<std::uint32_t>> m_graph; // 0-based
  std::map<std::uint32_t, KeyAdvert> m_adverts;
  std::map<std::uint32_t, std::vector<SealedShares>> m_sealed_by_to;
  std::set<std::uint32_t> m_u1, m_u2, m_u3, m_u4;
  std::vector<SurvivorSignature> m_signatures;
  std::set<std::uint32_t> m_signers; // the indices of m_signatures
  std::vector<std::uint32_t> m_sum;
  // owner → (holder, share): what the survivors revealed of each secret
  using SharesByOwner = std::map<std::uint32_t, std::vector<std::pair<std::uint32_t, Share>>>;
  SharesByOwner m_seed_shares;
  SharesByOwner m_key_shares;
};

} // namespace fedl::core::secagg
