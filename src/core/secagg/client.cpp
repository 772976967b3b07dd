// SPDX-License-Identifier: Apache-2.0
// SecAgg+'s site side (protocol.hpp, Client): its keys, the shares it seals, its masked input,
// its signature over the survivors and the shares it reveals.
#include "core/secagg/protocol.hpp"

#include "core/secagg/protocol_detail.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <utility>

namespace fedl::core::secagg {

using namespace detail;

Client::Client(Params p, std::uint32_t index, Signer sign)
  : m_p(std::move(p)), m_index(index), m_sign(std::move(sign)), m_c(KeyPair::generate()), m_s(KeyPair::generate())
{
  m_p.check();
  if (index == 0 || index > m_p.sites.size()) {
    throw UsageError("secure-aggregation index {} of {} sites", index, m_p.sites.size());
  }
  const auto graph = neighbour_graph(m_p.sites.size(), m_p.neighbours, m_p.graph_seed);
  for (const auto v : graph[index - 1]) {
    m_neighbours.push_back(v + 1);
  }
  m_seed = random_key("a secure-aggregation seed");
}

KeyAdvert
Client::advertise() const
{
  KeyAdvert a{m_index, m_c.public_key(), m_s.public_key(), commitment(m_seed, m_p, m_index), {}};
  a.signature = m_sign(advert_payload(m_p, a));
  return a;
}

std::vector<SealedShares>
Client::share(std::span<const KeyAdvert> adverts, const Verifier& verify)
{
  if (!m_adverts.empty()) {
    throw ProtocolAbort("keys relayed twice in one attempt");
  }
  for (const auto& a : adverts) {
    if (!std::binary_search(m_neighbours.begin(), m_neighbours.end(), a.index)) {
      throw ProtocolAbort("the keys of site {}, which is not a neighbour", a.index);
    }
    if (m_adverts.count(a.index) != 0) {
      throw ProtocolAbort("the keys of site {} twice", a.index);
    }
    if (!verify(a.index, advert_payload(m_p, a), a.signature)) {
      throw ProtocolAbort("the keys of site {} are not signed by it", a.index);
    }
    m_adverts.emplace(a.index, a);
  }
  if (m_adverts.size() < m_p.threshold) {
    throw ProtocolAbort("{} neighbours advertised keys, fewer than the threshold {}", m_adverts.size(), m_p.threshold);
  }
  std::vector<std::uint32_t> xs;
  for (const auto& [v, a] : m_adverts) {
    xs.push_back(v);
  }
  const auto key_shares = split(m_s.secret(), m_p.threshold, xs);
  const auto seed_shares = split(m_seed, m_p.threshold, xs);
  std::vector<SealedShares> out;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const auto v = xs[i];
    std::vector<std::byte> plain;
    put_u32(plain, m_index);
    put_u32(plain, v);
    for (const auto y : key_shares[i].y) {
      put_u64(plain, y);
    }
    for (const auto y : seed_shares[i].y) {
      put_u64(plain, y);
    }
    auto key = pair_key(m_c, m_adverts.at(v).c_public, m_p, "shares", m_index, v);
    out.push_back({m_index, v, seal(key, nonce(m_index, v), context(m_p, "sealed", m_index, v), plain)});
    OPENSSL_cleanse(key.data(), key.size());
    OPENSSL_cleanse(plain.data(), plain.size());
  }
  return out;
}

std::variant<MaskedInput, Complaint>
Client::mask(std::vector<std::uint32_t> input, std::span<const SealedShares> received)
{
  if (input.size() != m_p.length) {
    throw ProtocolAbort("an input of {} words where the round sums {}", input.size(), m_p.length);
  }
  if (!m_masked_with.empty()) {
    throw ProtocolAbort("shares relayed twice in one attempt");
  }
  for (const auto& s : received) {
    const auto it = m_adverts.find(s.from);
    if (s.to != m_index || it == m_adverts.end() || m_masked_with.count(s.from) != 0) {
      throw ProtocolAbort("shares from site {} to site {} are not this site's to take", s.from, s.to);
    }
    auto key = pair_key(m_c, it->second.c_public, m_p, "shares", m_index, s.from);
    const auto plain = s.sealed.size() == sealed_bytes
                         ? open(key, nonce(s.from, m_index), context(m_p, "sealed", s.from, m_index), s.sealed)
                         : std::nullopt;
    OPENSSL_cleanse(key.data(), key.size());
    if (!plain || get_u32(*plain, 0) != s.from || get_u32(*plain, 4) != m_index) {
      return Complaint{m_index, s.from};
    }
    Share key_share{m_index, {}};
    Share seed_share{m_index, {}};
    for (std::size_t l = 0; l < limbs; ++l) {
      key_share.y.push_back(get_u64(*plain, 8 + 8 * l));
      seed_share.y.push_back(get_u64(*plain, 8 + 8 * (limbs + l)));
    }
    const auto in_field = [](const Share& sh) {
      return std::all_of(sh.y.begin(), sh.y.end(), [](std::uint64_t y) { return y < field_prime; });
    };
    if (!in_field(key_share) || !in_field(seed_share)) {
      return Complaint{m_index, s.from};
    }
    m_key_shares.emplace(s.from, std::move(key_share));
    m_seed_shares.emplace(s.from, std::move(seed_share));
    m_masked_with.insert(s.from);
  }
  if (m_masked_with.size() < m_p.threshold) {
    throw ProtocolAbort("{} neighbours sent shares, fewer than the threshold {}", m_masked_with.size(), m_p.threshold);
  }
  MaskedInput out{m_index, std::move(input)};
  std::vector<MaskTerm> terms{{self_mask_key(m_seed, m_p, m_index), +1}};
  for (const auto v : m_masked_with) {
    terms.push_back({pair_key(m_s, m_adverts.at(v).s_public, m_p, "mask", m_index, v), pair_sign(m_index, v)});
  }
  apply_masks(out.masked, terms);
  OPENSSL_cleanse(terms.data(), terms.size() * sizeof(MaskTerm));
  m_sent_input = true;
  return out;
}

SurvivorSignature
Client::agree(const UnmaskRequest& request)
{
  if (!m_sent_input) {
    throw ProtocolAbort("asked to sign the survivors without having sent a masked input");
  }
  if (m_signed) {
    if (*m_signed != request.survivors) {
      throw ProtocolAbort("asked to sign a second, different list of survivors in one attempt");
    }
    return {m_index, m_sign(survivors_payload(m_p, request.survivors))};
  }
  const std::set<std::uint32_t> survivors(request.survivors.begin(), request.survivors.end());
  if (survivors.size() != request.survivors.size() ||
      !std::is_sorted(request.survivors.begin(), request.survivors.end()) || survivors.count(m_index) == 0 ||
      *survivors.rbegin() > m_p.sites.size()) {
    throw ProtocolAbort("the list of survivors is not sorted, repeats a site, names an unknown one or leaves "
                        "this one out");
  }
  std::size_t alive = 0;
  for (const auto v : m_masked_with) {
    alive += survivors.count(v);
  }
  if (alive < m_p.threshold) {
    throw ProtocolAbort("{} of its neighbours survived, fewer than the threshold {}", alive, m_p.threshold);
  }
  m_signed = request.survivors;
  return {m_index, m_sign(survivors_payload(m_p, request.survivors))};
}

Reveal
Client::unmask(const UnmaskRequest& request, std::span<const SurvivorSignature> signatures, const Verifier& verify)
{
  if (m_answered) {
    throw ProtocolAbort("asked to reveal shares twice in one attempt");
  }
  if (!m_signed || *m_signed != request.survivors) {
    throw ProtocolAbort("asked to reveal shares for a list of survivors it did not sign");
  }
  m_answered = true; // whatever happens next: one answer per attempt, never a second one
  const std::set<std::uint32_t> survivors(request.survivors.begin(), request.survivors.end());
  const auto payload = survivors_payload(m_p, request.survivors);
  std::set<std::uint32_t> agreed;
  for (const auto& s : signatures) {
    if (survivors.count(s.index) != 0 && agreed.count(s.index) == 0 && verify(s.index, payload, s.signature)) {
      agreed.insert(s.index);
    }
  }
  if (agreed.size() < consistency_quorum(m_p)) {
    throw ProtocolAbort("only {} survivors signed the list of survivors, fewer than the {} needed", agreed.size(),
                        consistency_quorum(m_p));
  }
  Reveal r{m_index, {}, {}};
  for (const auto v : m_masked_with) {
    if (survivors.count(v) != 0) {
      r.seeds.push_back({v, m_seed_shares.at(v)});
    } else {
      r.keys.push_back({v, m_key_shares.at(v)});
    }
  }
  return r;
}

} // namespace fedl::core::secagg
