// SPDX-License-Identifier: Apache-2.0
// The cryptography of secure aggregation against published known answers: X25519 (RFC 7748),
// HKDF-SHA256 (RFC 5869), AES-256-CTR (NIST SP 800-38A) for the masks, AES-256-GCM (the GCM
// specification's test case 16, McGrew and Viega 2005); Shamir sharing against a polynomial
// evaluated independently (Python integers, in the comment).
#include "core/net/secagg_protocol.hpp"
#include "core/secagg/crypto.hpp"
#include "core/secagg/encoding.hpp"
#include "core/secagg/protocol.hpp"
#include "core/secagg/shamir.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/key_stream.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

using namespace fedl::core;
using namespace fedl::core::secagg;

namespace {

std::vector<std::byte>
hex(std::string_view h)
{
  std::vector<std::byte> out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) {
    out.push_back(static_cast<std::byte>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

template<std::size_t N>
std::array<std::byte, N>
hex_array(std::string_view h)
{
  const auto v = hex(h);
  REQUIRE(v.size() == N);
  std::array<std::byte, N> a{};
  std::copy(v.begin(), v.end(), a.begin());
  return a;
}

std::vector<std::byte>
bytes_of(std::span<const std::byte> s)
{
  return {s.begin(), s.end()};
}

} // namespace

TEST_SUITE_BEGIN("secagg");

TEST_CASE("secagg: X25519 matches RFC 7748, and refuses a key of small order")
{
  // Section 5.2, the first test vector: scalar and u-coordinate to the output u-coordinate.
  const auto scalar = hex_array<32>("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
  const auto u = hex_array<32>("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
  CHECK(KeyPair::from_secret(scalar).agree(u) ==
        hex_array<32>("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"));
  // Section 6.1: Alice's and Bob's key pairs and the secret they agree on.
  const auto alice =
    KeyPair::from_secret(hex_array<32>("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
  const auto bob =
    KeyPair::from_secret(hex_array<32>("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
  CHECK(alice.public_key() == hex_array<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
  CHECK(bob.public_key() == hex_array<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
  const auto shared = hex_array<32>("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
  CHECK(alice.agree(bob.public_key()) == shared);
  CHECK(bob.agree(alice.public_key()) == shared);
  // u = 0 and u = 1 are of small order: every secret agrees on zeros with them.
  CHECK_THROWS_AS(alice.agree(Bytes32{}), Error);
  Bytes32 one{};
  one[0] = std::byte{1};
  CHECK_THROWS_AS(alice.agree(one), Error);
  // Fresh pairs agree with each other and differ from each other.
  const auto a = KeyPair::generate();
  const auto b = KeyPair::generate();
  CHECK(a.public_key() != b.public_key());
  CHECK(a.agree(b.public_key()) == b.agree(a.public_key()));
}

TEST_CASE("secagg: HKDF-SHA256 matches RFC 5869")
{
  const std::vector<std::byte> ikm(22, std::byte{0x0b});
  // Test case 1: salt 0x00..0x0c, info 0xf0..0xf9, 42 bytes.
  CHECK(hkdf_sha256(ikm, hex("000102030405060708090a0b0c"), hex("f0f1f2f3f4f5f6f7f8f9"), 42) ==
        hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"));
  // Test case 3: no salt, no info.
  CHECK(hkdf_sha256(ikm, {}, {}, 42) ==
        hex("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"));
  // Past 255 × 32 bytes HKDF has no output.
  CHECK_THROWS_AS(hkdf_sha256(ikm, {}, {}, 255 * 32 + 1), Error);
}

TEST_CASE("secagg: the AES-256-CTR key stream matches NIST SP 800-38A, and masks cancel")
{
  // F.5.5 CTR-AES256.Encrypt: the output blocks for counters f0f1..feff, f0f1..ff00, ...
  const auto key = hex_array<32>("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
  KeyStream stream(key, hex_array<16>("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"));
  std::vector<std::byte> out(64);
  stream.fill(std::span(out).first(5)); // pieces of any size continue the stream
  stream.fill(std::span(out).subspan(5));
  CHECK(out == hex("0bdf7df1591716335e9a8b15c860c502"
                   "5a6e699d536119065433863c8f657b94"
                   "1bc12c9c01610d5d0d8bd6a3378eca62"
                   "2956e1c8693536b1bee99c73a31576b6"));

  // A mask is the key stream from counter 0 read as little-endian words, over any length.
  const std::size_t n = 10'007;
  std::vector<std::byte> ks(4 * n);
  KeyStream(key).fill(ks);
  std::vector<std::uint32_t> v(n, 0);
  apply_mask(v, key, +1);
  bool words_match = true;
  for (std::size_t j = 0; j < n; ++j) {
    words_match = words_match && v[j] == get_le(ks.data() + 4 * j, 4);
  }
  CHECK(words_match);
  // Two sites' opposite masks of one pairwise key cancel in the sum, modulo 2^32.
  std::vector<std::uint32_t> x(n);
  std::vector<std::uint32_t> y(n);
  std::mt19937 rng(7);
  for (std::size_t j = 0; j < n; ++j) {
    x[j] = static_cast<std::uint32_t>(rng());
    y[j] = static_cast<std::uint32_t>(rng());
  }
  auto mx = x;
  auto my = y;
  apply_mask(mx, key, +1);
  apply_mask(my, key, -1);
  bool sums = true;
  for (std::size_t j = 0; j < n; ++j) {
    sums = sums && static_cast<std::uint32_t>(mx[j] + my[j]) == static_cast<std::uint32_t>(x[j] + y[j]);
  }
  CHECK(sums);
  CHECK(mx != x);
}

TEST_CASE("secagg: AES-256-GCM matches the GCM specification's test case 16, and refuses altered bytes")
{
  const auto key = hex_array<32>("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
  const auto nonce = hex_array<12>("cafebabefacedbaddecaf888");
  const auto plain = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                         "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
  const auto aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
  const auto want = hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
                        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
                        "76fc6ece0f4e1768cddf8853bb2d551b");
  const auto sealed = seal(key, nonce, aad, plain);
  CHECK(sealed == want);
  const auto opened = open(key, nonce, aad, sealed);
  REQUIRE(opened);
  CHECK(*opened == plain);
  for (const std::size_t at : {std::size_t{0}, sealed.size() / 2, sealed.size() - 1}) {
    auto bad = sealed;
    bad[at] ^= std::byte{1};
    CHECK_FALSE(open(key, nonce, aad, bad));
  }
  auto other_aad = aad;
  other_aad[0] ^= std::byte{1};
  CHECK_FALSE(open(key, nonce, other_aad, sealed));
  CHECK_FALSE(open(key, nonce, aad, std::span(sealed).first(15)));
  auto other_key = key;
  other_key[31] ^= std::byte{1};
  CHECK_FALSE(open(other_key, nonce, aad, sealed));
}

TEST_CASE("secagg: Shamir shares match an independent evaluation, and any threshold of them recovers the secret")
{
  // Coefficients from the SP 800-38A stream above, 8 bytes each, little-endian, masked to 61
  // bits: c1 = 0x13161759f17ddf0b, c2 = 0x02c560c8158b9a5e; the secret 01..07 is the one limb
  // s = 0x07060504030201. In Python: (s + c1*x + c2*x*x) % (2**61 - 1) for x = 1, 2, 3, 7.
  KeyStream stream(hex_array<32>("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"),
                   hex_array<16>("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"));
  const auto secret = hex("01020304050607");
  const std::vector<std::uint32_t> xs{1, 2, 3, 7};
  const auto shares = split(secret, 3, xs, &stream);
  REQUIRE(shares.size() == 4);
  CHECK(shares[0].y == std::vector<std::uint64_t>{1576961525687286634ULL});
  CHECK(shares[1].y == std::vector<std::uint64_t>{1245447440630098320ULL});
  CHECK(shares[2].y == std::vector<std::uint64_t>{1313277697491012722ULL});
  CHECK(shares[3].y == std::vector<std::uint64_t>{966356125688309588ULL});

  // A 32-byte key, shared among 7 with threshold 4: every 4 of them give it back, in any order.
  const auto key = KeyPair::generate().secret();
  const std::vector<std::uint32_t> seven{3, 9, 27, 81, 243, 729, 2187};
  const auto parts = split(key, 4, seven);
  REQUIRE(parts[0].y.size() == limbs_of(32));
  std::vector<std::size_t> pick{0, 1, 2, 3, 4, 5, 6};
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    std::shuffle(pick.begin(), pick.end(), rng);
    std::vector<Share> some;
    for (std::size_t k = 0; k < 4; ++k) {
      some.push_back(parts[pick[k]]);
    }
    CHECK(combine(some, 4, 32) == bytes_of(key));
  }
  CHECK(consistent(parts, 4));
  // Below the threshold: refused. An altered share: caught by the consistency check, and what
  // the threshold recovers with it is not the secret.
  CHECK_THROWS_AS(combine(std::span(parts).first(3), 4, 32), Error);
  auto altered = parts;
  altered[5].y[2] = (altered[5].y[2] + 1) % field_prime;
  CHECK_FALSE(consistent(altered, 4));
  std::vector<Share> with_bad{altered[5], altered[0], altered[1], altered[2]};
  bool recovered = false;
  try {
    recovered = combine(with_bad, 4, 32) == bytes_of(key);
  } catch (const Error&) {
  }
  CHECK_FALSE(recovered);
}

TEST_CASE("secagg: Shamir refuses malformed arguments and shares")
{
  const auto secret = hex("00ff00ff");
  const std::vector<std::uint32_t> xs{1, 2, 3};
  CHECK_THROWS_AS(split({}, 2, xs), UsageError);
  CHECK_THROWS_AS(split(std::vector<std::byte>(65), 2, xs), UsageError);
  CHECK_THROWS_AS(split(secret, 0, xs), UsageError);
  CHECK_THROWS_AS(split(secret, 4, xs), UsageError);
  CHECK_THROWS_AS(split(secret, 2, std::vector<std::uint32_t>{1, 1}), UsageError);
  CHECK_THROWS_AS(split(secret, 2, std::vector<std::uint32_t>{0, 1}), UsageError);
  const auto shares = split(secret, 2, xs);
  CHECK(combine(shares, 2, 4) == secret);
  CHECK(combine(std::span(shares).last(2), 2, 4) == secret);
  auto twice = shares;
  twice[1].x = twice[0].x;
  CHECK_THROWS_AS(combine(twice, 2, 4), Error);
  auto zero = shares;
  zero[0].x = 0;
  CHECK_THROWS_AS(combine(zero, 2, 4), Error);
  auto outside = shares;
  outside[0].y[0] = field_prime;
  CHECK_THROWS_AS(combine(outside, 2, 4), Error);
  auto longer = shares;
  longer[1].y.push_back(0);
  CHECK_THROWS_AS(combine(longer, 2, 4), Error);
  CHECK_THROWS_AS(combine(shares, 2, 8), Error); // 8 bytes need two limbs
  CHECK_THROWS_AS(combine(shares, 2, 0), Error);
  // A single-limb secret of 4 bytes: a recovered limb past 32 bits is not one.
  auto wrong = shares;
  wrong[0].y[0] = (wrong[0].y[0] + (std::uint64_t{1} << 40)) % field_prime;
  CHECK_THROWS_AS(combine(wrong, 2, 4), Error);
}

// ---------------------------------------------------------------------------------------------
// The protocol, every site and the coordinator in this process.

namespace {

// A stand-in for the sites' identity keys: site i "signs" with SHA-256 over i and the payload.
std::string
fake_sign(std::uint32_t index, std::span<const std::byte> payload)
{
  Sha256 h;
  const auto label = "site " + std::to_string(index);
  h.update(as_bytes(label));
  h.update(payload);
  return h.hex();
}

// One attempt of n sites. drop[s] lists the sites that stop before stage s (0 keys, 1 shares,
// 2 input, 3 reveal).
struct Simulation
{
  Params p;
  std::vector<std::vector<std::uint32_t>> inputs;
  std::optional<Server> server;
  std::vector<std::unique_ptr<Client>> clients;

  Simulation(std::size_t n, std::size_t k, std::size_t t, std::size_t length, std::uint64_t seed = 42)
  {
    for (std::size_t i = 0; i < n; ++i) {
      p.sites.push_back("site-" + std::to_string(i + 1));
    }
    p.round = 7;
    p.attempt = 1;
    p.threshold = t;
    p.neighbours = k;
    p.graph_seed = seed;
    p.length = length;
    server.emplace(p);
    std::mt19937 rng(static_cast<unsigned>(seed));
    for (std::uint32_t i = 1; i <= n; ++i) {
      clients.push_back(
        std::make_unique<Client>(p, i, [i](std::span<const std::byte> payload) { return fake_sign(i, payload); }));
      std::vector<std::uint32_t> x(length);
      for (auto& v : x) {
        v = static_cast<std::uint32_t>(rng());
      }
      inputs.push_back(std::move(x));
    }
  }

  static bool verify(std::uint32_t index, std::span<const std::byte> payload, std::string_view sig)
  {
    return fake_sign(index, payload) == sig;
  }

  // Runs the four stages; the sum the coordinator unmasks (or its exception).
  std::vector<std::uint32_t> run(const std::array<std::set<std::uint32_t>, 4>& drop)
  {
    const auto alive = [&](std::uint32_t i, std::size_t stage) {
      for (std::size_t s = 0; s <= stage; ++s) {
        if (drop[s].count(i) != 0) {
          return false;
        }
      }
      return true;
    };
    for (auto& c : clients) {
      if (alive(c->index(), 0)) {
        REQUIRE_FALSE(server->add_advert(c->advertise()));
      }
    }
    for (auto& c : clients) {
      if (alive(c->index(), 1)) {
        REQUIRE_FALSE(server->add_shares(c->index(), c->share(server->adverts_for(c->index()), verify)));
      }
    }
    for (auto& c : clients) {
      if (alive(c->index(), 2)) {
        auto out = c->mask(inputs[c->index() - 1], server->shares_for(c->index()));
        REQUIRE(std::holds_alternative<MaskedInput>(out));
        REQUIRE_FALSE(server->add_masked(std::get<MaskedInput>(std::move(out))));
      }
    }
    const auto request = server->unmask_request();
    for (auto& c : clients) {
      if (alive(c->index(), 3) && server->survivors().count(c->index()) != 0) {
        std::optional<SurvivorSignature> signature;
        try {
          signature = c->agree(request);
        } catch (const ProtocolAbort&) {
          // Too few of its neighbours survived: it stops here.
        }
        if (signature) {
          REQUIRE_FALSE(server->add_signature(*signature));
        }
      }
    }
    for (auto& c : clients) {
      if (alive(c->index(), 3) && server->survivors().count(c->index()) != 0) {
        std::optional<Reveal> reveal;
        try {
          reveal = c->unmask(request, server->signatures(), verify);
        } catch (const ProtocolAbort&) {
          // Too few signatures of the survivors: it reveals nothing.
        }
        if (reveal) {
          REQUIRE_FALSE(server->add_reveal(std::move(*reveal)));
        }
      }
    }
    return server->unmasked_sum();
  }

  // The plain sum of the inputs of the sites that sent masked inputs.
  std::vector<std::uint32_t> plain_sum() const
  {
    std::vector<std::uint32_t> s(p.length, 0);
    for (const auto u : server->survivors()) {
      for (std::size_t j = 0; j < p.length; ++j) {
        s[j] += inputs[u - 1][j];
      }
    }
    return s;
  }
};

} // namespace

TEST_CASE("secagg: the neighbour graph is k-regular, symmetric, and fixed by its seed")
{
  for (const auto& [n, k] : {std::pair<std::size_t, std::size_t>{12, 4}, {100, 8}, {7, 6}, {5, 10}, {31, 2}}) {
    CAPTURE(n);
    CAPTURE(k);
    const auto g = neighbour_graph(n, k, 99);
    const std::size_t degree = std::min(k, n - 1);
    bool regular = true;
    bool symmetric = true;
    for (std::size_t i = 0; i < n; ++i) {
      regular = regular && g[i].size() == degree && std::is_sorted(g[i].begin(), g[i].end()) &&
                std::adjacent_find(g[i].begin(), g[i].end()) == g[i].end();
      for (const auto j : g[i]) {
        symmetric = symmetric && j != i && std::binary_search(g[j].begin(), g[j].end(), i);
      }
    }
    CHECK(regular);
    CHECK(symmetric);
    CHECK(neighbour_graph(n, k, 99) == g);
    if (degree < n - 1) {
      CHECK(neighbour_graph(n, k, 100) != g);
    }
  }
  CHECK_THROWS_AS(neighbour_graph(10, 3, 1), UsageError);
  CHECK_NOTHROW(neighbour_graph(10, 9, 1));
  // The defaults: everyone up to 16 sites, then 2⌈log2 n⌉ + 2; a majority of them as threshold.
  CHECK(default_neighbours(2) == 1);
  CHECK(default_neighbours(16) == 15);
  CHECK(default_neighbours(17) == 12);
  CHECK(default_neighbours(100) == 16);
  CHECK(default_neighbours(1000) == 22);
  CHECK(default_threshold(1) == 2);
  CHECK(default_threshold(4) == 3);
  CHECK(default_threshold(15) == 8);
  for (const std::size_t n : {17, 100, 1000}) {
    CHECK_NOTHROW(neighbour_graph(n, default_neighbours(n), 3));
  }
}

TEST_CASE("secagg: the coordinator unmasks exactly the sum of the survivors' inputs, with dropouts at every stage")
{
  SUBCASE("everyone, all neighbours")
  {
    Simulation sim(5, 4, 3, 1000);
    const auto sum = sim.run({});
    CHECK(sum == sim.plain_sum());
    CHECK(sim.server->survivors().size() == 5);
  }
  SUBCASE("a sparse graph: 12 sites of 4 neighbours")
  {
    Simulation sim(12, 4, 3, 777);
    const auto sum = sim.run({});
    CHECK(sum == sim.plain_sum());
  }
  SUBCASE("one of 6 killed after it sent its masked input, and one after its shares")
  {
    Simulation sim(6, 5, 3, 513);
    const auto sum = sim.run({std::set<std::uint32_t>{}, {}, {4}, {2}});
    CHECK(sim.server->survivors() == std::set<std::uint32_t>{1, 2, 3, 5, 6});
    CHECK(sum == sim.plain_sum());
  }
  SUBCASE("two of 6 killed after they sent their masked inputs")
  {
    Simulation sim(6, 5, 3, 300);
    const auto sum = sim.run({std::set<std::uint32_t>{}, {}, {}, {1, 3}});
    CHECK(sim.server->survivors().size() == 6);
    CHECK(sum == sim.plain_sum());
  }
  SUBCASE("one of 6 killed before its shares, one after its masked input")
  {
    // (A site's own secrets are shared with its neighbours only: with t = 3, every survivor's
    // seed needs 3 of the others to reveal.)
    Simulation sim(6, 5, 3, 64);
    const auto sum = sim.run({std::set<std::uint32_t>{}, {6}, {}, {3}});
    CHECK(sim.server->shared() == std::set<std::uint32_t>{1, 2, 3, 4, 5});
    CHECK(sum == sim.plain_sum());
  }
  SUBCASE("dropouts in a sparse graph: 20 sites of 6 neighbours, 3 lost after sharing, 2 after input")
  {
    Simulation sim(20, 6, 3, 100, 5);
    const auto sum = sim.run({std::set<std::uint32_t>{}, {}, {2, 9, 17}, {5, 11}});
    CHECK(sum == sim.plain_sum());
  }
  SUBCASE("too many lost before revealing: the masks cannot be removed, and the error says whose")
  {
    Simulation sim(5, 4, 3, 10);
    try {
      (void)sim.run({std::set<std::uint32_t>{}, {}, {1}, {2, 3, 4}});
      FAIL("unmasked below the threshold");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("cannot be removed: fewer than 3 consistent shares") != std::string::npos);
    }
  }
}

TEST_CASE("secagg: what the coordinator holds of one site's input looks uniformly random")
{
  // Three sites with inputs of all zeros: a masked input is the masks alone. Chi-square over the
  // 256 byte values of 64 KiB (255 degrees of freedom; the 99.99th percentile is about 363).
  Simulation sim(3, 2, 2, 16384);
  for (auto& x : sim.inputs) {
    std::fill(x.begin(), x.end(), 0U);
  }
  for (auto& c : sim.clients) {
    REQUIRE_FALSE(sim.server->add_advert(c->advertise()));
  }
  for (auto& c : sim.clients) {
    REQUIRE_FALSE(
      sim.server->add_shares(c->index(), c->share(sim.server->adverts_for(c->index()), Simulation::verify)));
  }
  const auto out = sim.clients[0]->mask(sim.inputs[0], sim.server->shares_for(1));
  const auto& masked = std::get<MaskedInput>(out).masked;
  std::array<double, 256> count{};
  for (const auto w : masked) {
    for (int b = 0; b < 4; ++b) {
      count[(w >> (8 * b)) & 0xff] += 1;
    }
  }
  const double expected = static_cast<double>(masked.size() * 4) / 256.0;
  double chi2 = 0;
  for (const auto c : count) {
    chi2 += (c - expected) * (c - expected) / expected;
  }
  CHECK(chi2 < 363.0);
}

TEST_CASE("secagg: a site refuses what would break the protocol, and says who sent garbage")
{
  Simulation sim(5, 4, 3, 8);
  for (auto& c : sim.clients) {
    REQUIRE_FALSE(sim.server->add_advert(c->advertise()));
  }
  SUBCASE("a key advert whose signature is not its site's")
  {
    auto adverts = sim.server->adverts_for(1);
    adverts[1].s_public[0] ^= std::byte{1};
    CHECK_THROWS_AS(sim.clients[0]->share(adverts, Simulation::verify), ProtocolAbort);
  }
  SUBCASE("fewer neighbours than the threshold")
  {
    auto adverts = sim.server->adverts_for(1);
    adverts.resize(2);
    CHECK_THROWS_AS(sim.clients[0]->share(adverts, Simulation::verify), ProtocolAbort);
  }
  SUBCASE("sealed shares that do not open: a complaint about their sender; a second unmask refused")
  {
    for (auto& c : sim.clients) {
      REQUIRE_FALSE(
        sim.server->add_shares(c->index(), c->share(sim.server->adverts_for(c->index()), Simulation::verify)));
    }
    auto received = sim.server->shares_for(1);
    REQUIRE(received.size() == 4);
    received[2].sealed[20] ^= std::byte{0x40};
    const auto out = sim.clients[0]->mask(sim.inputs[0], received);
    REQUIRE(std::holds_alternative<Complaint>(out));
    CHECK(std::get<Complaint>(out).about == received[2].from);
    // It sent no masked input: it signs no list of survivors, even one that names it.
    CHECK_THROWS_AS(sim.clients[0]->agree(UnmaskRequest{{1, 2, 3, 4, 5}}), ProtocolAbort);

    for (std::size_t i = 1; i < 5; ++i) {
      auto ok = sim.clients[i]->mask(sim.inputs[i], sim.server->shares_for(sim.clients[i]->index()));
      REQUIRE(std::holds_alternative<MaskedInput>(ok));
    }
    const UnmaskRequest request{{2, 3, 4, 5}};
    std::vector<SurvivorSignature> sigs;
    for (std::size_t i = 1; i < 5; ++i) {
      sigs.push_back(sim.clients[i]->agree(request));
    }
    // A second, different list is not signed: site 3 called dropped, for its key.
    CHECK_THROWS_AS(sim.clients[1]->agree(UnmaskRequest{{2, 4, 5}}), ProtocolAbort);
    // Revealing needs signatures of a majority (3 of 5) over the list it signed, from survivors.
    CHECK_THROWS_AS(sim.clients[1]->unmask(request, std::span(sigs).first(2), Simulation::verify), ProtocolAbort);
    auto forged = sigs;
    forged[2].signature = forged[3].signature;
    CHECK_THROWS_AS(sim.clients[2]->unmask(request, std::span(forged).first(3), Simulation::verify), ProtocolAbort);
    const auto reveal = sim.clients[3]->unmask(request, sigs, Simulation::verify);
    CHECK(reveal.seeds.size() + reveal.keys.size() == 4);
    // Asked again, with site 3 called dropped, it would reveal site 3's key beside its seed.
    CHECK_THROWS_AS(sim.clients[3]->unmask(request, sigs, Simulation::verify), ProtocolAbort);
  }
  SUBCASE("a coordinator that names different survivors to different sites gets no shares")
  {
    for (auto& c : sim.clients) {
      REQUIRE_FALSE(
        sim.server->add_shares(c->index(), c->share(sim.server->adverts_for(c->index()), Simulation::verify)));
    }
    for (auto& c : sim.clients) {
      REQUIRE(
        std::holds_alternative<MaskedInput>(c->mask(sim.inputs[c->index() - 1], sim.server->shares_for(c->index()))));
    }
    // Sites 1-3 are told everyone survived; sites 4 and 5 that site 1 did not (to get site 1's key
    // from them while sites 2 and 3 give its seed).
    const UnmaskRequest all{{1, 2, 3, 4, 5}};
    const UnmaskRequest without_1{{2, 3, 4, 5}};
    std::vector<SurvivorSignature> sigs_all;
    std::vector<SurvivorSignature> sigs_without;
    for (std::size_t i = 0; i < 3; ++i) {
      sigs_all.push_back(sim.clients[i]->agree(all));
    }
    for (std::size_t i = 3; i < 5; ++i) {
      sigs_without.push_back(sim.clients[i]->agree(without_1));
    }
    // Every signature there is, relayed to everyone: each list has only its own signers.
    auto every = sigs_all;
    every.insert(every.end(), sigs_without.begin(), sigs_without.end());
    CHECK_NOTHROW(sim.clients[1]->unmask(all, every, Simulation::verify)); // 3 of 5 signed "all"
    CHECK_THROWS_AS(sim.clients[3]->unmask(without_1, every, Simulation::verify), ProtocolAbort);
    CHECK_THROWS_AS(sim.clients[4]->unmask(without_1, every, Simulation::verify), ProtocolAbort);
  }
}

TEST_CASE("secagg: the coordinator checks every message, and outvotes one wrong share")
{
  Simulation sim(6, 5, 3, 16);
  auto& server = *sim.server;
  auto advert = sim.clients[0]->advertise();
  REQUIRE_FALSE(server.add_advert(advert));
  CHECK(server.add_advert(advert)); // twice
  auto stranger = advert;
  stranger.index = 7;
  CHECK(server.add_advert(stranger));
  for (std::size_t i = 1; i < 6; ++i) {
    REQUIRE_FALSE(server.add_advert(sim.clients[i]->advertise()));
  }
  std::vector<std::vector<SealedShares>> shares;
  for (auto& c : sim.clients) {
    shares.push_back(c->share(server.adverts_for(c->index()), Simulation::verify));
  }
  auto missing = shares[0];
  missing.pop_back();
  CHECK(server.add_shares(1, missing));
  auto resized = shares[0];
  resized[0].sealed.push_back(std::byte{0});
  CHECK(server.add_shares(1, resized));
  CHECK(server.add_shares(2, shares[0])); // site 1's shares as site 2's
  for (std::uint32_t i = 1; i <= 6; ++i) {
    REQUIRE_FALSE(server.add_shares(i, shares[i - 1]));
  }
  CHECK(server.add_masked(MaskedInput{1, std::vector<std::uint32_t>(15)}));
  for (auto& c : sim.clients) {
    REQUIRE_FALSE(
      server.add_masked(std::get<MaskedInput>(c->mask(sim.inputs[c->index() - 1], server.shares_for(c->index())))));
  }
  const auto request = server.unmask_request();
  for (auto& c : sim.clients) {
    REQUIRE_FALSE(server.add_signature(c->agree(request)));
  }
  CHECK(server.add_signature(sim.clients[0]->agree(request)));              // twice
  CHECK(server.add_masked(MaskedInput{1, std::vector<std::uint32_t>(16)})); // the survivors are named
  std::vector<Reveal> reveals;
  for (auto& c : sim.clients) {
    reveals.push_back(c->unmask(request, server.signatures(), Simulation::verify));
  }
  // Site 2 lies about its share of site 1's seed: with 5 shares of it, the other 4 outvote it.
  for (auto& s : reveals[1].seeds) {
    if (s.owner == 1) {
      s.share.y[0] = (s.share.y[0] + 12345) % field_prime;
    }
  }
  auto foreign = reveals[2];
  foreign.seeds[0].share.x = 99;
  CHECK(server.add_reveal(foreign));
  for (auto& r : reveals) {
    REQUIRE_FALSE(server.add_reveal(r));
  }
  CHECK(server.add_reveal(reveals[0])); // twice
  CHECK(server.unmasked_sum() == sim.plain_sum());
}

TEST_CASE("secagg: weighted updates encode into words whose masked sum decodes to the weighted mean")
{
  // Three sites of 10, 20 and 30 samples (cap 100), 1000 F32 values and 7 F64 ones in [−0.6, 0.6],
  // a few past the range of 0.5 that are clipped, and one NaN.
  const Encoding e{0.5, 100, 3};
  REQUIRE(e.scale() == std::exp2(30)); // 3 · 0.5 · 2^30 < 2^31 − 1 ≤ 3 · 0.5 · 2^31
  REQUIRE(e.weight_scale() == std::exp2(30));
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-0.6F, 0.6F);
  std::vector<std::vector<float>> f(3, std::vector<float>(1000));
  std::vector<std::vector<double>> d(3, std::vector<double>(7));
  for (int s = 0; s < 3; ++s) {
    for (auto& x : f[s]) {
      x = u(rng);
    }
    for (auto& x : d[s]) {
      x = static_cast<double>(u(rng));
    }
  }
  f[1][17] = std::numeric_limits<float>::quiet_NaN();
  const auto views = [&](int s) {
    return std::vector<TensorView>{{"w", DType::f32, {10, 100}, std::as_bytes(std::span(f[s]))},
                                   {"b", DType::f64, {7}, std::as_bytes(std::span(d[s]))}};
  };
  const std::array<std::uint64_t, 3> samples{10, 20, 30};
  std::vector<std::uint32_t> sum(1008, 0);
  Simulation sim(3, 2, 2, 1008);
  for (int s = 0; s < 3; ++s) {
    const auto enc = encode(views(s), samples[s], e);
    REQUIRE(enc.words.size() == 1008);
    std::size_t outside = 0;
    for (const auto x : f[s]) {
      outside += !(std::abs(x) <= 0.5F) ? 1 : 0;
    }
    for (const auto x : d[s]) {
      outside += !(std::abs(x) <= 0.5) ? 1 : 0;
    }
    CHECK(enc.clipped == outside);
    for (std::size_t j = 0; j < sum.size(); ++j) {
      sum[j] += enc.words[j];
    }
    sim.inputs[s] = enc.words;
  }
  // Through the protocol: the unmasked sum is the sum of the encoded words, bit for bit.
  const auto unmasked = sim.run({});
  CHECK(unmasked == sum);
  const auto dec = decode(unmasked, views(0), e);
  CHECK(dec.total_weight == doctest::Approx(0.6).epsilon(1e-9));
  REQUIRE(dec.mean.size() == 2);
  // Against the weighted mean of the clipped values: within N / (2 S) / Σw, plus float rounding.
  const auto clip = [](double x) { return std::isnan(x) ? 0.0 : std::clamp(x, -0.5, 0.5); };
  const double tolerance = 3.0 / (2 * e.scale()) / 0.6 + 1e-7;
  double worst = 0;
  for (std::size_t i = 0; i < 1000; ++i) {
    double want = 0;
    for (int s = 0; s < 3; ++s) {
      want += static_cast<double>(samples[s]) / 100.0 * clip(f[s][i]);
    }
    want /= 0.6;
    float got = 0;
    std::memcpy(&got, dec.mean[0].bytes.data() + 4 * i, 4);
    worst = std::max(worst, std::abs(static_cast<double>(got) - want));
  }
  for (std::size_t i = 0; i < 7; ++i) {
    double want = 0;
    for (int s = 0; s < 3; ++s) {
      want += static_cast<double>(samples[s]) / 100.0 * clip(d[s][i]);
    }
    want /= 0.6;
    double got = 0;
    std::memcpy(&got, dec.mean[1].bytes.data() + 8 * i, 8);
    worst = std::max(worst, std::abs(got - want));
  }
  CHECK(worst <= tolerance);
  CHECK(dec.mean[1].dtype == DType::f64);
  CHECK(dec.mean[0].shape == std::vector<std::int64_t>{10, 100});
}

TEST_CASE("secagg: at the range's ends N sites' words do not overflow, and bad settings are refused")
{
  const Encoding e{2.0, 1000, 5};
  const std::vector<float> top(4, 2.0F);
  const std::vector<float> bottom(4, -2.0F);
  std::vector<std::uint32_t> hi(5, 0);
  std::vector<std::uint32_t> lo(5, 0);
  for (int s = 0; s < 5; ++s) {
    const auto a = encode(std::vector<TensorView>{{"x", DType::f32, {4}, std::as_bytes(std::span(top))}}, 5000, e);
    const auto b = encode(std::vector<TensorView>{{"x", DType::f32, {4}, std::as_bytes(std::span(bottom))}}, 1000, e);
    for (std::size_t j = 0; j < 5; ++j) {
      hi[j] += a.words[j];
      lo[j] += b.words[j];
    }
  }
  const std::vector<TensorView> like{{"x", DType::f32, {4}, std::as_bytes(std::span(top))}};
  const auto dh = decode(hi, like, e);
  const auto dl = decode(lo, like, e);
  float x = 0;
  std::memcpy(&x, dh.mean[0].bytes.data(), 4);
  CHECK(x == 2.0F);
  std::memcpy(&x, dl.mean[0].bytes.data(), 4);
  CHECK(x == -2.0F);
  CHECK(dh.total_weight == 5.0); // 5000 samples count as the cap, 1000

  CHECK_THROWS_AS((Encoding{0.0, 1, 1}.check()), UsageError);
  CHECK_THROWS_AS((Encoding{std::nan(""), 1, 1}.check()), UsageError);
  CHECK_THROWS_AS((Encoding{1.0, 0, 1}.check()), UsageError);
  CHECK_THROWS_AS((Encoding{1.0, 1, 0}.check()), UsageError);
  CHECK_THROWS_AS((Encoding{1e6, 1, 100}.check()), UsageError);
  const std::vector<std::int32_t> ints(4, 1);
  CHECK_THROWS_AS(encode(std::vector<TensorView>{{"i", DType::i32, {4}, std::as_bytes(std::span(ints))}}, 1, e),
                  UsageError);
  CHECK_THROWS_AS(encode(like, 0, e), UsageError);
  CHECK_THROWS_AS(decode(std::vector<std::uint32_t>(4), like, e), Error);
  CHECK_THROWS_AS(decode(std::vector<std::uint32_t>(5), like, e), Error); // no weight
}

TEST_CASE("secagg: each value is rounded half to even, as nearbyint, whatever its sign; tensors go by name")
{
  // Range 1 over 1 site: S = 2^31 / 2 (the largest power of two with R · S ≤ 2^31 − 1), so
  // x = k / S + 0.5 / S is a tie.
  const Encoding e{1.0, 1, 1};
  const double s = e.scale();
  std::vector<double> values;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int k = -3; k <= 3; ++k) {
    values.push_back((k + 0.5) / s);
    values.push_back(k / s);
  }
  for (int i = 0; i < 1000; ++i) {
    values.push_back(u(rng));
  }
  values.push_back(1.0);
  values.push_back(-1.0);
  values.push_back(2.0); // clipped
  values.push_back(std::nan(""));
  const std::vector<TensorView> t{
    {"x", DType::f64, {static_cast<std::int64_t>(values.size())}, std::as_bytes(std::span(values))}};
  const auto enc = encode(t, 1, e);
  REQUIRE(enc.words.size() == values.size() + 1);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double x = std::isnan(values[i]) ? 0.0 : std::clamp(values[i], -1.0, 1.0);
    const auto want = static_cast<std::uint32_t>(static_cast<std::int64_t>(std::nearbyint(x * s)));
    CHECK(enc.words[i] == want);
  }
  CHECK(enc.clipped == 2);
  // Two tensors given in either order encode the same words.
  const std::vector<float> a{1e-3F, 2e-3F};
  const std::vector<float> b{-5e-3F};
  const std::vector<TensorView> ab{{"a", DType::f32, {2}, std::as_bytes(std::span(a))},
                                   {"b", DType::f32, {1}, std::as_bytes(std::span(b))}};
  const std::vector<TensorView> ba{ab[1], ab[0]};
  CHECK(encode(ab, 1, e).words == encode(ba, 1, e).words);
  const auto back = decode(encode(ab, 1, e).words, ba, e);
  CHECK(back.mean[0].name == "b");
  CHECK(back.mean[1].name == "a");
}

TEST_CASE("secagg: with a clip norm an update is scaled down to it over all its tensors, and one within it is not")
{
  const Encoding e{4.0, 1, 1};
  // ‖(3, 0) ∪ (4)‖ = 5: clipped to 1, the values become 0.6, 0 and 0.8.
  const std::vector<float> a{3.0F, 0.0F};
  const std::vector<double> b{4.0};
  const std::vector<TensorView> t{{"a", DType::f32, {2}, std::as_bytes(std::span(a))},
                                  {"b", DType::f64, {1}, std::as_bytes(std::span(b))}};
  const auto words = [&](std::optional<double> clip) { return encode(t, 1, e, clip).words; };
  const auto value = [&](std::uint32_t w) { return static_cast<double>(static_cast<std::int32_t>(w)) / e.scale(); };
  const auto clipped = words(1.0);
  CHECK(value(clipped[0]) == doctest::Approx(0.6).epsilon(1e-6));
  CHECK(value(clipped[1]) == 0.0);
  CHECK(value(clipped[2]) == doctest::Approx(0.8).epsilon(1e-6));
  CHECK(words(5.5) == words(std::nullopt)); // within the norm: as without a clip
  CHECK(value(words(std::nullopt)[2]) == 4.0);
}

TEST_CASE("secagg: with distributed DP each site's words carry discrete Gaussian noise, and the sum carries N times "
          "its variance")
{
  const Encoding e{1.0, 1, 10, 0.01};
  CHECK(e.scale() == std::exp2(std::floor(std::log2((0x1p31 - 1) / (10 + 10 * std::sqrt(10.0) * 0.01)))));
  const std::vector<float> zeros(20000, 0.0F);
  const std::vector<TensorView> t{{"x", DType::f32, {20000}, std::as_bytes(std::span(zeros))}};
  std::vector<std::uint32_t> sum(20001, 0);
  for (int site = 0; site < 10; ++site) {
    const auto enc = encode(t, 1, e);
    CHECK(enc.words.back() == static_cast<std::uint32_t>(e.weight_scale())); // the weight carries none
    for (std::size_t j = 0; j < sum.size(); ++j) {
      sum[j] += enc.words[j];
    }
  }
  const auto d = decode(sum, t, e, 1.0);
  CHECK(d.total_weight == 10.0);
  double sq = 0;
  for (std::size_t i = 0; i < 20000; ++i) {
    float v = 0;
    std::memcpy(&v, d.mean[0].bytes.data() + 4 * i, 4);
    sq += static_cast<double>(v) * v;
  }
  CHECK(std::sqrt(sq / 20000) == doctest::Approx(std::sqrt(10.0) * 0.01).epsilon(0.02));
  CHECK_THROWS_AS((Encoding{1.0, 1, 10, -1}.check()), UsageError);
  CHECK_THROWS_AS((Encoding{1.0, 1, 10, std::nan("")}.check()), UsageError);
}

// ---------------------------------------------------------------------------------------------
// On the wire.

namespace {

// `value` through JSON text and back, as a frame header travels.
nlohmann::json
over_the_wire(const nlohmann::json& value)
{
  return nlohmann::json::parse(value.dump());
}

} // namespace

TEST_CASE("secagg: every stage's message survives the wire, and a malformed one is a protocol error")
{
  Simulation sim(5, 4, 3, 32);
  const auto advert = sim.clients[0]->advertise();

  const auto keys = SecAggKeys::from_header(over_the_wire(SecAggKeys{9, advert}.to_header()));
  CHECK(keys.task == 9);
  CHECK(keys.advert.index == advert.index);
  CHECK(keys.advert.c_public == advert.c_public);
  CHECK(keys.advert.s_public == advert.s_public);
  CHECK(keys.advert.seed_commitment == advert.seed_commitment);
  CHECK(keys.advert.signature == advert.signature);
  auto bad = SecAggKeys{9, advert}.to_header();
  bad["c_public"] = std::string(bad["c_public"]).substr(2);
  CHECK_THROWS_AS(SecAggKeys::from_header(bad), ProtocolError);
  bad = SecAggKeys{9, advert}.to_header();
  bad["index"] = 0;
  CHECK_THROWS_AS(SecAggKeys::from_header(bad), ProtocolError);
  bad = SecAggKeys{9, advert}.to_header();
  bad["s_public"] = std::string(64, 'g');
  CHECK_THROWS_AS(SecAggKeys::from_header(bad), ProtocolError);

  const SecAggPeers peers{9, {{advert, "-----BEGIN CERTIFICATE-----"}}};
  const auto peers_back = SecAggPeers::from_header(over_the_wire(peers.to_header()), 4);
  REQUIRE(peers_back.peers.size() == 1);
  CHECK(peers_back.peers[0].certificate == "-----BEGIN CERTIFICATE-----");
  CHECK_THROWS_AS(SecAggPeers::from_header(peers.to_header(), 0), ProtocolError); // more than allowed
  auto big = peers.to_header();
  big["peers"][0]["certificate"] = std::string(16 * 1024 + 1, 'c');
  CHECK_THROWS_AS(SecAggPeers::from_header(big, 4), ProtocolError);

  for (auto& c : sim.clients) {
    REQUIRE_FALSE(sim.server->add_advert(c->advertise()));
  }
  const auto sealed = sim.clients[0]->share(sim.server->adverts_for(1), Simulation::verify);
  const auto shares = SecAggShares::from_header(over_the_wire(SecAggShares{9, sealed}.to_header()), 4);
  REQUIRE(shares.shares.size() == sealed.size());
  CHECK(shares.shares[1].sealed == sealed[1].sealed);
  CHECK(shares.shares[1].to == sealed[1].to);
  CHECK_THROWS_AS(SecAggShares::from_header(SecAggShares{9, sealed}.to_header(), 3), ProtocolError);
  auto short_share = SecAggShares{9, sealed}.to_header();
  short_share["shares"][0]["sealed"] = std::string(short_share["shares"][0]["sealed"]).substr(0, 200);
  CHECK_THROWS_AS(SecAggShares::from_header(short_share, 4), ProtocolError);

  SecAggInput input{9,
                    std::nullopt,
                    3,
                    0.5,
                    100,
                    2.5,
                    std::string(R"({"steps":1})"),
                    "sig",
                    SandboxLevel::automatic,
                    ModelPolicy::inspect};
  const auto input_back = SecAggInput::from_header(over_the_wire(input.to_header()));
  CHECK(input_back.sandbox == SandboxLevel::automatic);
  CHECK(input_back.model_policy == ModelPolicy::inspect);
  CHECK_FALSE(input_back.complaint);
  CHECK(input_back.clipped == 3);
  CHECK(input_back.range == 0.5);
  CHECK(input_back.dp == std::optional<std::string>(R"({"steps":1})"));
  CHECK(input_back.clip_norm == std::optional<double>(2.5));
  auto long_dp = input.to_header();
  long_dp["dp"] = std::string(4097, 'x');
  CHECK_THROWS_AS(SecAggInput::from_header(long_dp), ProtocolError);
  input.complaint = 4;
  CHECK(SecAggInput::from_header(over_the_wire(input.to_header())).complaint == std::optional<std::uint32_t>(4));
  // The signed payload names the words and every field of the report.
  const auto p = sim.p;
  const auto one = secagg_input_payload(p, 1, "aa", input);
  CHECK(one != secagg_input_payload(p, 1, "ab", input));
  CHECK(one != secagg_input_payload(p, 2, "aa", input));
  auto other = input;
  other.clipped = 4;
  CHECK(one != secagg_input_payload(p, 1, "aa", other));
  other = input;
  other.dp.reset();
  CHECK(one != secagg_input_payload(p, 1, "aa", other));
  other = input;
  other.clip_norm = 2.0;
  CHECK(one != secagg_input_payload(p, 1, "aa", other));

  const SecAggUnmask named{9, {1, 2, 5}, {{1, "s1"}, {5, "s5"}}};
  const auto unmask = SecAggUnmask::from_header(over_the_wire(named.to_header()), 5);
  CHECK(unmask.survivors == std::vector<std::uint32_t>{1, 2, 5});
  REQUIRE(unmask.signatures.size() == 2);
  CHECK(unmask.signatures[1].index == 5);
  CHECK(unmask.signatures[1].signature == "s5");
  CHECK_THROWS_AS(SecAggUnmask::from_header(named.to_header(), 2), ProtocolError);
  CHECK_THROWS_AS(SecAggUnmask::from_header(SecAggUnmask{9, {0}, {}}.to_header(), 5), ProtocolError);
  auto long_sig = named.to_header();
  long_sig["signatures"][0]["signature"] = std::string(257, 's');
  CHECK_THROWS_AS(SecAggUnmask::from_header(long_sig, 5), ProtocolError);
  const auto sig = SecAggSignature::from_header(over_the_wire(SecAggSignature{9, {3, "abc"}}.to_header()));
  CHECK(sig.signature.index == 3);
  CHECK(sig.signature.signature == "abc");
  CHECK_THROWS_AS(SecAggSignature::from_header(nlohmann::json{{"task", 9}, {"index", 0}}), ProtocolError);

  secagg::Reveal reveal{2, {{1, Share{2, {1, 2, 3, 4, 5}}}}, {{3, Share{2, {6, 7, 8, 9, 10}}}}};
  const auto reveal_back = SecAggReveal::from_header(over_the_wire(SecAggReveal{9, reveal}.to_header()), 4);
  REQUIRE(reveal_back.reveal.seeds.size() == 1);
  CHECK(reveal_back.reveal.seeds[0].share.y == std::vector<std::uint64_t>{1, 2, 3, 4, 5});
  CHECK(reveal_back.reveal.keys[0].owner == 3);
  CHECK_THROWS_AS(SecAggReveal::from_header(SecAggReveal{9, reveal}.to_header(), 1), ProtocolError);
  auto outside = SecAggReveal{9, reveal}.to_header();
  outside["seeds"][0]["y"][0] = field_prime;
  CHECK_THROWS_AS(SecAggReveal::from_header(outside, 4), ProtocolError);
  auto fewer = SecAggReveal{9, reveal}.to_header();
  fewer["keys"][0]["y"].erase(0);
  CHECK_THROWS_AS(SecAggReveal::from_header(fewer, 4), ProtocolError);
  auto negative = SecAggReveal{9, reveal}.to_header();
  negative["keys"][0]["y"][1] = -1;
  CHECK_THROWS_AS(SecAggReveal::from_header(negative, 4), ProtocolError);
}

TEST_CASE("secagg: the setup a task carries gives the protocol's parameters, checked")
{
  SecAggSetup s{{"a", "b", "c", "d"}, 2, 2, 3, 77, 1001, 0.25, 500, std::nullopt};
  auto back = SecAggSetup::from_json(over_the_wire(s.to_json()));
  CHECK_FALSE(back.clip_norm);
  s.clip_norm = 1.5;
  back = SecAggSetup::from_json(over_the_wire(s.to_json()));
  CHECK(back.clip_norm == std::optional<double>(1.5));
  auto bad_clip = s.to_json();
  bad_clip["clip_norm"] = -1;
  CHECK_THROWS_AS(SecAggSetup::from_json(bad_clip), ProtocolError);
  CHECK(back.sites == s.sites);
  CHECK(back.index == 2);
  const auto p = back.params(5, 1);
  CHECK(p.round == 5);
  CHECK(p.threshold == 2);
  CHECK(p.length == 1001);
  CHECK(back.encoding().range == 0.25);
  auto beyond = s.to_json();
  beyond["index"] = 5;
  CHECK_THROWS_AS(SecAggSetup::from_json(beyond), ProtocolError);
  auto weak = s;
  weak.threshold = 1;
  CHECK_THROWS_AS(weak.params(5, 1), UsageError);
  auto wide = s;
  wide.range = 0;
  CHECK_THROWS_AS(wide.encoding(), UsageError);
  auto names = s.to_json();
  names["sites"][1] = 7;
  CHECK_THROWS_AS(SecAggSetup::from_json(names), ProtocolError);
  CHECK_THROWS_AS(SecAggSetup::from_json(nlohmann::json::array()), ProtocolError);
}

TEST_SUITE_END();
