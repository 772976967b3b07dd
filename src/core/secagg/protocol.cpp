// SPDX-License-Identifier: Apache-2.0
#include "core/secagg/protocol.hpp"

#include "core/util/file_io.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>

namespace fedl::core::secagg {

namespace {

constexpr std::string_view protocol_label = "fedl-secagg-v1";
constexpr std::size_t secret_bytes = 32;
constexpr std::size_t limbs = secret_limbs;
constexpr std::size_t sealed_bytes = sealed_share_bytes;

// `v` appended as `n` little-endian bytes.
void
put(std::vector<std::byte>& out, std::uint64_t v, std::size_t n)
{
  out.resize(out.size() + n);
  put_le(out.data() + out.size() - n, v, n);
}

void
put_u32(std::vector<std::byte>& out, std::uint32_t v)
{
  put(out, v, 4);
}

void
put_u64(std::vector<std::byte>& out, std::uint64_t v)
{
  put(out, v, 8);
}

std::uint64_t
get_u64(std::span<const std::byte> in, std::size_t at)
{
  return get_le(in.data() + at, 8);
}

std::uint32_t
get_u32(std::span<const std::byte> in, std::size_t at)
{
  return static_cast<std::uint32_t>(get_le(in.data() + at, 4));
}

void
put_text(std::vector<std::byte>& out, std::string_view s)
{
  put_u32(out, static_cast<std::uint32_t>(s.size()));
  for (const char c : s) {
    out.push_back(static_cast<std::byte>(c));
  }
}

// What binds a derived key or a sealed message to one purpose, round, attempt and pair of sites.
std::vector<std::byte>
context(const Params& p, std::string_view purpose, std::uint32_t a, std::uint32_t b)
{
  std::vector<std::byte> out;
  put_text(out, protocol_label);
  put_text(out, purpose);
  put_u64(out, p.round);
  put_u64(out, p.attempt);
  put_u32(out, a);
  put_u32(out, b);
  return out;
}

Bytes32
derive(std::span<const std::byte> ikm, const std::vector<std::byte>& info)
{
  const auto out = hkdf_sha256(ikm, as_bytes(protocol_label), info, 32);
  Bytes32 key{};
  std::copy(out.begin(), out.end(), key.begin());
  return key;
}

// The key of the pair (a, b) for `purpose`, from their X25519 agreement.
Bytes32
pair_key(const KeyPair& mine, const Bytes32& theirs, const Params& p, std::string_view purpose, std::uint32_t a,
         std::uint32_t b)
{
  auto shared = mine.agree(theirs);
  const auto key = derive(shared, context(p, purpose, std::min(a, b), std::max(a, b)));
  OPENSSL_cleanse(shared.data(), shared.size());
  return key;
}

Bytes32
self_mask_key(const Bytes32& seed, const Params& p, std::uint32_t index)
{
  return derive(seed, context(p, "self-mask", index, 0));
}

Bytes32
commitment(const Bytes32& seed, const Params& p, std::uint32_t index)
{
  auto material = context(p, "seed-commitment", index, 0);
  material.insert(material.end(), seed.begin(), seed.end());
  Sha256 h;
  h.update(material);
  const auto digest = h.digest();
  Bytes32 out{};
  std::copy(digest.begin(), digest.end(), out.begin());
  return out;
}

std::array<std::byte, 12>
nonce(std::uint32_t from, std::uint32_t to)
{
  std::vector<std::byte> v;
  put_u32(v, from);
  put_u32(v, to);
  put_u32(v, 0);
  std::array<std::byte, 12> n{};
  std::copy(v.begin(), v.end(), n.begin());
  return n;
}

// +1 if `a` adds the mask it shares with `b` (the smaller index does), −1 if it subtracts it.
int
pair_sign(std::uint32_t a, std::uint32_t b)
{
  return a < b ? 1 : -1;
}

std::uint64_t
uniform_below(KeyStream& stream, std::uint64_t bound)
{
  // Rejection sampling: the largest multiple of bound below 2^64 keeps the draw unbiased.
  const std::uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  for (;;) {
    std::array<std::byte, 8> b{};
    stream.fill(b);
    const auto v = get_u64(b, 0);
    if (v < limit) {
      return v % bound;
    }
  }
}

} // namespace

std::vector<std::vector<std::uint32_t>>
neighbour_graph(std::size_t n, std::size_t k, std::uint64_t seed)
{
  std::vector<std::vector<std::uint32_t>> graph(n);
  if (n == 0) {
    return graph;
  }
  if (k + 1 >= n) {
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t j = 0; j < n; ++j) {
        if (j != i) {
          graph[i].push_back(static_cast<std::uint32_t>(j));
        }
      }
    }
    return graph;
  }
  if (k == 0 || k % 2 != 0) {
    throw UsageError("a neighbour degree of {} for {} sites: it must be even, or at least {}", k, n, n - 1);
  }
  // A random order of the sites on the ring (Fisher-Yates), from a key stream keyed by the seed.
  std::vector<std::byte> material;
  put_text(material, protocol_label);
  put_text(material, "graph");
  put_u64(material, seed);
  Sha256 h;
  h.update(material);
  const auto digest = h.digest();
  KeyStream::Key key{};
  std::copy(digest.begin(), digest.end(), key.begin());
  KeyStream stream(key);
  std::vector<std::uint32_t> ring(n);
  std::iota(ring.begin(), ring.end(), 0U);
  for (std::size_t i = n - 1; i > 0; --i) {
    std::swap(ring[i], ring[uniform_below(stream, i + 1)]);
  }
  for (std::size_t pos = 0; pos < n; ++pos) {
    for (std::size_t d = 1; d <= k / 2; ++d) {
      graph[ring[pos]].push_back(ring[(pos + d) % n]);
      graph[ring[pos]].push_back(ring[(pos + n - d) % n]);
    }
  }
  for (auto& g : graph) {
    std::sort(g.begin(), g.end());
  }
  return graph;
}

std::size_t
default_neighbours(std::size_t n)
{
  if (n <= 16) {
    return n > 0 ? n - 1 : 0;
  }
  std::size_t log = 0;
  while ((std::size_t{1} << log) < n) {
    ++log;
  }
  return std::min(2 * log + 2, n - 1 - (n - 1) % 2);
}

std::size_t
default_threshold(std::size_t k)
{
  return std::max<std::size_t>(2, k / 2 + 1);
}

void
Params::check() const
{
  const std::size_t n = sites.size();
  if (n < 2) {
    throw UsageError("secure aggregation needs at least 2 sites, not {}", n);
  }
  const std::size_t degree = std::min(neighbours, n - 1);
  if (threshold < 2 || threshold > degree) {
    throw UsageError("a secure-aggregation threshold of {} with {} neighbours per site: it must be 2 to {}", threshold,
                     degree, degree);
  }
  if (length == 0) {
    throw UsageError("secure aggregation of an empty vector");
  }
  std::set<std::string_view> seen;
  for (const auto& s : sites) {
    if (s.empty() || !seen.insert(s).second) {
      throw UsageError("secure aggregation's sites must be named and distinct ({} is not)", s);
    }
  }
}

std::vector<std::byte>
advert_payload(const Params& p, const KeyAdvert& a)
{
  auto out = context(p, "keys", a.index, 0);
  put_text(out, a.index >= 1 && a.index <= p.sites.size() ? std::string_view(p.sites[a.index - 1]) : "");
  out.insert(out.end(), a.c_public.begin(), a.c_public.end());
  out.insert(out.end(), a.s_public.begin(), a.s_public.end());
  out.insert(out.end(), a.seed_commitment.begin(), a.seed_commitment.end());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Client

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
Client::mask(std::span<const std::uint32_t> input, std::span<const SealedShares> received)
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
  MaskedInput out{m_index, {input.begin(), input.end()}};
  std::vector<MaskTerm> terms{{self_mask_key(m_seed, m_p, m_index), +1}};
  for (const auto v : m_masked_with) {
    terms.push_back({pair_key(m_s, m_adverts.at(v).s_public, m_p, "mask", m_index, v), pair_sign(m_index, v)});
  }
  apply_masks(out.masked, terms);
  OPENSSL_cleanse(terms.data(), terms.size() * sizeof(MaskTerm));
  m_sent_input = true;
  return out;
}

std::vector<std::byte>
survivors_payload(const Params& p, std::span<const std::uint32_t> survivors)
{
  auto out = context(p, "survivors", 0, 0);
  put_u32(out, static_cast<std::uint32_t>(survivors.size()));
  for (const auto v : survivors) {
    put_u32(out, v);
  }
  return out;
}

std::size_t
consistency_quorum(const Params& p)
{
  return std::max(p.threshold, p.sites.size() / 2 + 1);
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

// ---------------------------------------------------------------------------------------------
// Server

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
  if (m_u2.count(m.index) == 0 || m_u3.count(m.index) != 0 || !m_signatures.empty() || !m_u4.empty()) {
    return "a masked input out of turn (no shares sent, a second one, or after the survivors were named)";
  }
  if (m.masked.size() != m_p.length) {
    return "a masked input of the wrong length";
  }
  m_u3.insert(m.index);
  add_words(m_sum.data(), m.masked.data(), m_sum.size(), +1);
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
  if (m_u3.count(s.index) == 0 || !m_u4.empty() ||
      std::any_of(m_signatures.begin(), m_signatures.end(), [&](const auto& o) { return o.index == s.index; })) {
    return "a signature of the survivors out of turn (not a survivor, a second one, or after the reveals)";
  }
  if (s.signature.size() > 256) {
    return "a signature of more than 256 characters";
  }
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
      if (i != skip) {
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
  for (const auto u : m_u3) {
    const auto it = m_seed_shares.find(u);
    const auto& advert = m_adverts.at(u);
    const auto seed =
      it == m_seed_shares.end()
        ? std::nullopt
        : rebuild(
            it->second, t, [&](const Bytes32& s) { return commitment(s, m_p, u) == advert.seed_commitment; }, bad);
    if (!seed) {
      lost.push_back(u);
      continue;
    }
    terms.push_back({self_mask_key(*seed, m_p, u), -1});
  }
  for (const auto v : m_u2) {
    if (m_u3.count(v) != 0) {
      continue;
    }
    const auto it = m_key_shares.find(v);
    const auto& advert = m_adverts.at(v);
    const auto secret =
      it == m_key_shares.end()
        ? std::nullopt
        : rebuild(
            it->second, t, [&](const Bytes32& s) { return KeyPair::from_secret(s).public_key() == advert.s_public; },
            bad);
    if (!secret) {
      lost.push_back(v);
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
    std::string names;
    for (const auto v : lost) {
      names += (names.empty() ? "" : ", ") + m_p.sites[v - 1];
    }
    std::string liars;
    for (const auto v : bad) {
      liars += (liars.empty() ? "" : ", ") + m_p.sites[v - 1];
    }
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
