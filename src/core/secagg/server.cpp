// SPDX-License-Identifier: Apache-2.0
// SecAgg+'s coordinator side (protocol.hpp, Server): every message checked before it is kept, and
// the masks of the survivors and of the sites dropped after sharing removed from the sum.
#include "core/secagg/protocol.hpp"

#include "core/secagg/protocol_detail.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <utility>

namespace fedl::core::secagg {

using namespace detail;

Server::Server(Params p) : m_p(std::move(p))
{
  m_p.check();
  m_graph = neighbour_graph(m_p.sites.size(), m_p.neighbours, m_p.graph_seed);
  m_sum.assign(m_p.length, 0);
}

namespace {

bool
is_neighbour(std::span<const std::vector<std::uint32_t>> graph, std::uint32_t a, std::uint32_t b)
{
  const auto& g = graph[a - 1];
  return std::binary_search(g.begin(), g.end(), b - 1);
}

} // namespace

std::optional<std::string>
Server::add_advert(KeyAdvert a)
{
  if (a.index == 0 || a.index > m_p.sites.size() || m_u1.count(a.index) != 0 || !m_u2.empty()) {
    return "keys out of turn (an unknown index, a second advert, or after the shares)";
  }
  if (a.signature.size() > 256) {
    return "a signature of more than 256 characters";
  }
  m_u1.insert(a.index);
  m_adverts.emplace(a.index, std::move(a));
  return std::nullopt;
}

std::vector<KeyAdvert>
Server::adverts_for(std::uint32_t index) const
{
  std::vector<KeyAdvert> out;
  for (const auto v : m_graph.at(index - 1)) {
    if (const auto it = m_adverts.find(v + 1); it != m_adverts.end()) {
      out.push_back(it->second);
    }
  }
  return out;
}

std::optional<std::string>
Server::add_shares(std::uint32_t from, std::vector<SealedShares> shares)
{
  if (m_u1.count(from) == 0 || m_u2.count(from) != 0 || !m_u3.empty()) {
    return "shares out of turn (no keys advertised, a second set, or after the masked inputs)";
  }
  // Exactly one for each neighbour that advertised keys: a missing one would leave that pair's
  // masks uncancelled.
  std::set<std::uint32_t> want;
  for (const auto& a : adverts_for(from)) {
    want.insert(a.index);
  }
  std::set<std::uint32_t> got;
  for (const auto& s : shares) {
    if (s.from != from || want.count(s.to) == 0 || !got.insert(s.to).second || s.sealed.size() != sealed_bytes) {
      return "a malformed set of shares (wrong sender or recipient, a repeat, or a wrong size)";
    }
  }
  if (got != want) {
    return "shares for some neighbours are missing";
  }
  m_u2.insert(from);
  for (auto& s : shares) {
    m_sealed_by_to[s.to].push_back(std::move(s));
  }
  return std::nullopt;
}

std::vector<SealedShares>
Server::shares_for(std::uint32_t index) const
{
  const auto it = m_sealed_by_to.find(index);
  return it == m_sealed_by_to.end() ? std::vector<SealedShares>{} : it->second;
}

std::optional<std::string>
Server::add_masked(MaskedInput m)
{
  return add_masked(m.index, std::as_bytes(std::span(m.masked)), std::endian::native);
}

std::optional<std::string>
Server::add_masked(std::uint32_t index, std::span<const std::byte> words, std::endian order)
{
  if (m_u2.count(index) == 0 || m_u3.count(index) != 0 || !m_signatures.empty() || !m_u4.empty()) {
    return "a masked input out of turn (no shares sent, a second one, or after the survivors were named)";
  }
  if (words.size() != m_p.length * 4) {
    return fmt::format("a masked input of {} bytes, not {}", words.size(), m_p.length * 4);
  }
  m_u3.insert(index);
  // In blocks through a buffer in L1: the bytes need not be aligned, nor in this machine's order.
  constexpr std::size_t block = 2048;
  std::array<std::uint32_t, block> buf{};
  for (std::size_t begin = 0; begin < m_p.length; begin += block) {
    const std::size_t n = std::min(block, m_p.length - begin);
    std::memcpy(buf.data(), words.data() + 4 * begin, 4 * n);
    if (order != std::endian::native) {
      for (std::size_t j = 0; j < n; ++j) {
        buf[j] = __builtin_bswap32(buf[j]);
      }
    }
    add_words(m_sum.data() + begin, buf.data(), n, +1);
  }
  return std::nullopt;
}

UnmaskRequest
Server::unmask_request() const
{
  return {std::vector<std::uint32_t>(m_u3.begin(), m_u3.end())};
}

std::optional<std::string>
Server::add_signature(SurvivorSignature s)
{
  if (m_u3.count(s.index) == 0 || !m_u4.empty() || m_signers.count(s.index) != 0) {
    return "a signature of the survivors out of turn (not a survivor, a second one, or after the reveals)";
  }
  if (s.signature.size() > 256) {
    return "a signature of more than 256 characters";
  }
  m_signers.insert(s.index);
  m_signatures.push_back(std::move(s));
  return std::nullopt;
}

std::optional<std::string>
Server::add_reveal(Reveal r)
{
  if (m_u3.count(r.index) == 0 || m_u4.count(r.index) != 0) {
    return "shares revealed out of turn (not a survivor, or a second time)";
  }
  // A survivor reveals one share for each neighbour in U2: of the seed if it survived, of the key
  // if it did not.
  std::set<std::uint32_t> owners;
  const auto fits = [&](const RevealedShare& s, bool survivor) {
    return is_neighbour(m_graph, r.index, s.owner) && m_u2.count(s.owner) != 0 &&
           m_u3.count(s.owner) == (survivor ? 1U : 0U) && owners.insert(s.owner).second && s.share.x == r.index &&
           s.share.y.size() == limbs &&
           std::all_of(s.share.y.begin(), s.share.y.end(), [](std::uint64_t y) { return y < field_prime; });
  };
  for (const auto& s : r.seeds) {
    if (!fits(s, true)) {
      return "a malformed reveal (a share of another site's secret, a repeat, or out of the field)";
    }
  }
  for (const auto& s : r.keys) {
    if (!fits(s, false)) {
      return "a malformed reveal (a share of another site's secret, a repeat, or out of the field)";
    }
  }
  m_u4.insert(r.index);
  for (auto& s : r.seeds) {
    m_seed_shares[s.owner].emplace_back(r.index, std::move(s.share));
  }
  for (auto& s : r.keys) {
    m_key_shares[s.owner].emplace_back(r.index, std::move(s.share));
  }
  return std::nullopt;
}

namespace {

// A secret from `held` shares (holder, share) that passes `good`: the first t, then, if that
// fails, leaving out one holder at a time (one wrong share is found and named in `bad`).
std::optional<Bytes32>
rebuild(const std::vector<std::pair<std::uint32_t, Share>>& held, std::size_t t,
        const std::function<bool(const Bytes32&)>& good, std::set<std::uint32_t>& bad)
{
  const auto attempt = [&](std::optional<std::size_t> skip) -> std::optional<Bytes32> {
    std::vector<Share> use;
    for (std::size_t i = 0; i < held.size() && use.size() < t; ++i) {
      if (!skip || i != *skip) {
        use.push_back(held[i].second);
      }
    }
    if (use.size() < t) {
      return std::nullopt;
    }
    try {
      const auto bytes = combine(use, t, secret_bytes);
      Bytes32 s{};
      std::copy(bytes.begin(), bytes.end(), s.begin());
      if (good(s)) {
        return s;
      }
    } catch (const Error&) {
    }
    return std::nullopt;
  };
  if (auto s = attempt(std::nullopt)) {
    return s;
  }
  for (std::size_t skip = 0; skip < held.size() && held.size() > t; ++skip) {
    if (auto s = attempt(skip)) {
      bad.insert(held[skip].first);
      return s;
    }
  }
  return std::nullopt;
}

} // namespace

std::vector<std::uint32_t>
Server::unmasked_sum() const
{
  const auto t = m_p.threshold;
  std::set<std::uint32_t> bad;
  std::vector<std::uint32_t> lost;
  std::vector<MaskTerm> terms; // the masks to take away
  // `owner`'s secret from the shares revealed of it (in `held`) that passes `good`, or nothing
  // (and `owner` counted as lost).
  const auto secret_of = [&](const SharesByOwner& held, std::uint32_t owner,
                             const std::function<bool(const Bytes32&)>& good) -> std::optional<Bytes32> {
    const auto it = held.find(owner);
    auto s = it == held.end() ? std::nullopt : rebuild(it->second, t, good, bad);
    if (!s) {
      lost.push_back(owner);
    }
    return s;
  };
  for (const auto u : m_u3) {
    const auto& advert = m_adverts.at(u);
    if (const auto seed = secret_of(
          m_seed_shares, u, [&](const Bytes32& s) { return commitment(s, m_p, u) == advert.seed_commitment; })) {
      terms.push_back({self_mask_key(*seed, m_p, u), -1});
    }
  }
  for (const auto v : m_u2) {
    if (m_u3.count(v) != 0) {
      continue;
    }
    const auto& advert = m_adverts.at(v);
    const auto secret = secret_of(
      m_key_shares, v, [&](const Bytes32& s) { return KeyPair::from_secret(s).public_key() == advert.s_public; });
    if (!secret) {
      continue;
    }
    const auto pair = KeyPair::from_secret(*secret);
    for (const auto u : m_u3) {
      if (is_neighbour(m_graph, v, u)) {
        // u added the mask of (u, v) with u's sign: take it away.
        terms.push_back({pair_key(pair, m_adverts.at(u).s_public, m_p, "mask", v, u), -pair_sign(u, v)});
      }
    }
  }
  if (!lost.empty()) {
    const auto names_of = [&](const auto& indices) {
      std::string names;
      for (const auto v : indices) {
        names += (names.empty() ? "" : ", ") + m_p.sites[v - 1];
      }
      return names;
    };
    const auto names = names_of(lost);
    const auto liars = names_of(bad);
    OPENSSL_cleanse(terms.data(), terms.size() * sizeof(MaskTerm));
    throw Error("the masks of {} cannot be removed: fewer than {} consistent shares{}", names, t,
                liars.empty() ? std::string() : " (" + liars + " revealed shares that do not agree)");
  }
  auto result = m_sum;
  apply_masks(result, terms);
  OPENSSL_cleanse(terms.data(), terms.size() * sizeof(MaskTerm));
  return result;
}

} // namespace fedl::core::secagg
