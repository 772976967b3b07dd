// SPDX-License-Identifier: Apache-2.0
// SecAgg+'s shared parts (protocol.hpp): the neighbour graph, the parameters' checks, what a site
// signs, and the derivations both sides compute (protocol_detail.hpp). The site's side is in
// client.cpp, the coordinator's in server.cpp.
#include "core/secagg/protocol.hpp"

#include "core/secagg/protocol_detail.hpp"
#include "core/util/file_io.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>

namespace fedl::core::secagg {

using namespace detail;

namespace {

// `v` appended as `n` little-endian bytes.
void
put(std::vector<std::byte>& out, std::uint64_t v, std::size_t n)
{
  out.resize(out.size() + n);
  put_le(out.data() + out.size() - n, v, n);
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

namespace detail {

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

} // namespace detail

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

} // namespace fedl::core::secagg
