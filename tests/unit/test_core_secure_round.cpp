// SPDX-License-Identifier: Apache-2.0
// The coordinator's secure aggregation attempt (federation/secure_round.hpp) against real sites'
// protocol state (secagg::Client), with real Ed25519 certificates of one CA, every message passed
// through its wire encoding: the sum is exact, dropouts at each stage are survived or end the
// attempt below the threshold, and what a hostile site sends drops that site only.
#include "core/federation/secure_round.hpp"

#include "core/federation/serve_settings.hpp"
#include "core/net/secagg_protocol.hpp"
#include "core/secagg/protocol.hpp"
#include "core/trust/pki.hpp"
#include "core/util/file_io.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <endian.h>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace fedl::core;
using json = nlohmann::json;

namespace {

struct Sent
{
  std::string site;
  FrameType type;
  json header;
  std::shared_ptr<const std::string> body;
};

struct FakeHost : SecureHost
{
  std::vector<Sent> sent;
  std::map<std::string, std::string> dropped;
  void secure_send(const std::string& site, FrameType type, const json& header,
                   std::shared_ptr<const std::string> body) override
  {
    // Through the wire encoding, as a site would read it.
    sent.push_back({site, type, json::parse(header.dump()), std::move(body)});
  }
  void secure_drop(const std::string& site, const std::string& why) override { dropped[site] = why; }

  // The frames of `type` sent since `from`, by site.
  std::map<std::string, Sent> take(FrameType type, std::size_t& from)
  {
    std::map<std::string, Sent> out;
    for (; from < sent.size(); ++from) {
      if (sent[from].type == type) {
        out[sent[from].site] = sent[from];
      }
    }
    return out;
  }
};

// n sites of one CA, their clients, and the coordinator's attempt.
struct Federation
{
  static constexpr std::uint64_t task = 77;
  std::size_t n;
  std::size_t length;
  Identity ca = create_ca("fedl federation CA secure", {.days = 30});
  std::vector<std::string> names;
  std::map<std::string, Identity> ids;
  FakeHost host;
  std::unique_ptr<SecureRound> round;
  std::map<std::string, std::unique_ptr<secagg::Client>> clients;
  std::map<std::string, std::vector<std::uint32_t>> inputs;
  std::map<std::string, std::vector<std::byte>> bodies; // the masked inputs as sent
  std::size_t cursor = 0;
  double now = 0;

  explicit Federation(std::size_t sites, std::size_t words = 257, std::size_t threshold = 0) : n(sites), length(words)
  {
    std::vector<std::string> sorted;
    for (std::size_t i = 1; i <= n; ++i) {
      sorted.push_back("site-" + std::to_string(100 + i));
    }
    names = sorted;
    std::map<std::string, Cert> certs;
    for (const auto& name : names) {
      ids.emplace(name, issue_client_certificate(ca, name, {.days = 30}));
      certs.emplace(name, certificate_from_pem(to_pem(ids.at(name).cert), name));
    }
    secagg::Params p;
    p.round = 3;
    p.attempt = 1;
    p.sites = names;
    const auto shape = secure_shape(SecureAggregationConfig{}, n);
    p.threshold = threshold == 0 ? shape.threshold : threshold;
    p.neighbours = shape.neighbours;
    p.graph_seed = 99;
    p.length = length;
    SecureRound::Rules rules;
    rules.stage_timeout = 10;
    rules.quorum = 2;
    round = std::make_unique<SecureRound>(p, secagg::Encoding{1.0, 1, n}, task, std::move(certs), rules, host, now);
    std::mt19937 rng(5);
    for (const auto& name : names) {
      const auto setup = SecAggSetup::from_json(json::parse(round->setup_for(name).to_json().dump()));
      const auto& key = ids.at(name).key;
      clients.emplace(name, std::make_unique<secagg::Client>(
                              setup.params(3, 1), setup.index,
                              [&key](std::span<const std::byte> payload) { return sign(key, payload); }));
      auto& in = inputs[name];
      for (std::size_t i = 0; i < length; ++i) {
        in.push_back(rng());
      }
    }
  }

  secagg::Verifier verifier()
  {
    return [this](std::uint32_t index, std::span<const std::byte> payload, std::string_view signature) {
      return index >= 1 && index <= n && verify_signature(ids.at(names[index - 1]).cert, payload, signature);
    };
  }

  void keys(const std::set<std::string>& silent = {})
  {
    for (const auto& name : names) {
      if (silent.count(name) == 0) {
        round->keys(
          name,
          SecAggKeys::from_header(json::parse(SecAggKeys{task, clients.at(name)->advertise()}.to_header().dump())),
          now);
      }
    }
  }

  void shares(const std::set<std::string>& silent = {}, const std::string& garbage = {})
  {
    for (auto& [name, frame] : host.take(FrameType::secagg_peers, cursor)) {
      if (silent.count(name) > 0) {
        continue;
      }
      const auto peers = SecAggPeers::from_header(frame.header, n);
      std::vector<secagg::KeyAdvert> adverts;
      for (const auto& p : peers.peers) {
        adverts.push_back(p.advert);
      }
      auto sealed = clients.at(name)->share(adverts, verifier());
      if (name == garbage) {
        for (auto& s : sealed) {
          s.sealed[20] ^= std::byte{1};
        }
      }
      round->shares(name, SecAggShares::from_header(SecAggShares{task, sealed}.to_header(), n), now);
    }
  }

  // The masked inputs (or complaints) of every site that got its shares and is not `silent`.
  void inputs_stage(const std::set<std::string>& silent = {})
  {
    for (auto& [name, frame] : host.take(FrameType::secagg_shares, cursor)) {
      if (silent.count(name) > 0) {
        continue;
      }
      const auto received = SecAggShares::from_header(frame.header, n).shares;
      const auto masked = clients.at(name)->mask(inputs.at(name), received);
      SecAggInput in;
      in.task = task;
      in.range = 1.0;
      in.max_samples = 1;
      std::vector<std::byte> body;
      if (const auto* c = std::get_if<secagg::Complaint>(&masked)) {
        in.complaint = c->about;
      } else {
        for (const auto w : std::get<secagg::MaskedInput>(masked).masked) {
          const auto le = htole32(w);
          const auto* b = reinterpret_cast<const std::byte*>(&le);
          body.insert(body.end(), b, b + 4);
        }
      }
      const auto index = round->setup_for(name).index;
      in.signature = sign(ids.at(name).key, secagg_input_payload(round->params(), index, sha256_hex(body), in));
      (void)round->input(name, in, body);
      bodies[name] = std::move(body);
    }
  }

  void agree(const std::set<std::string>& silent = {})
  {
    for (auto& [name, frame] : host.take(FrameType::secagg_unmask, cursor)) {
      if (silent.count(name) == 0) {
        const auto m = SecAggUnmask::from_header(frame.header, n);
        round->signature(name, SecAggSignature{task, clients.at(name)->agree({m.survivors})}, now);
      }
    }
  }

  void reveal(const std::set<std::string>& silent = {})
  {
    for (auto& [name, frame] : host.take(FrameType::secagg_unmask, cursor)) {
      if (silent.count(name) > 0) {
        continue;
      }
      const auto m = SecAggUnmask::from_header(frame.header, n);
      REQUIRE(frame.body);
      const auto certs = secagg_certificates_from_body(as_bytes(*frame.body), n);
      CHECK(certs.size() == m.signatures.size());
      round->reveal(name, SecAggReveal{task, clients.at(name)->unmask({m.survivors}, m.signatures, verifier())}, now);
    }
  }

  // The deadline of the current stage passes.
  void later()
  {
    now += 11;
    round->tick(now);
  }

  std::vector<std::uint32_t> plain_sum(const std::set<std::string>& of) const
  {
    std::vector<std::uint32_t> sum(length, 0);
    for (const auto& name : of) {
      for (std::size_t i = 0; i < length; ++i) {
        sum[i] += inputs.at(name)[i];
      }
    }
    return sum;
  }
};

std::set<std::string>
all_but(const Federation& f, const std::set<std::string>& out)
{
  std::set<std::string> s;
  for (const auto& name : f.names) {
    if (out.count(name) == 0) {
      s.insert(name);
    }
  }
  return s;
}

} // namespace

TEST_CASE("secure round: every stage over the wire gives exactly the plain sum, and the record names no update")
{
  Federation f(5);
  f.keys();
  CHECK(f.round->stage() == SecureRound::Stage::shares);
  f.shares();
  CHECK(f.round->stage() == SecureRound::Stage::input);
  f.inputs_stage();
  f.round->close_input(f.now);
  CHECK(f.round->stage() == SecureRound::Stage::agree);
  f.agree();
  CHECK(f.round->stage() == SecureRound::Stage::unmask);
  f.reveal();
  REQUIRE(f.round->stage() == SecureRound::Stage::done);
  CHECK(f.round->sum() == f.plain_sum(all_but(f, {})));
  CHECK(f.host.dropped.empty());
  const auto record = f.round->record();
  CHECK(record["survivors"].size() == 5);
  CHECK(record["dropped_after_masking"].empty());
  CHECK(record["masked_inputs"].size() == 5);
  CHECK(record["threshold"] == 3);
  CHECK(record["neighbours"] == 4);
}

TEST_CASE("secure round: sites that drop at each stage are left out, and the sum holds every masked input")
{
  // 10 sites: t = 5 of 9 neighbours, and 6 signatures for the consistency quorum.
  Federation f(10);
  // site-101 never advertises; site-102 sends no shares; site-103 sends no input; site-104 goes
  // away after its input (its seed is rebuilt from the others' shares).
  f.keys({"site-101"});
  CHECK(f.round->stage() == SecureRound::Stage::keys);
  f.later();
  CHECK(f.host.dropped.count("site-101") == 1);
  CHECK(f.round->stage() == SecureRound::Stage::shares);
  f.shares({"site-102"});
  f.later();
  CHECK(f.host.dropped.count("site-102") == 1);
  REQUIRE(f.round->stage() == SecureRound::Stage::input);
  f.inputs_stage({"site-103"});
  f.round->close_input(f.now);
  f.round->gone("site-104", "disconnected", f.now);
  f.agree();
  f.reveal();
  REQUIRE(f.round->stage() == SecureRound::Stage::done);
  CHECK(f.round->sum() == f.plain_sum(all_but(f, {"site-101", "site-102", "site-103"})));
  const auto record = f.round->record();
  CHECK(record["dropped_after_masking"] == json::array({"site-104"}));
  CHECK(record["unmasked_by"].size() == 6);
}

TEST_CASE("secure round: below the threshold or the consistency quorum the attempt fails, saying why")
{
  SUBCASE("too few keys")
  {
    Federation f(5);
    f.keys({"site-101", "site-102", "site-103"});
    f.later();
    CHECK(f.round->stage() == SecureRound::Stage::failed);
    CHECK(f.round->failure().find("below the threshold 3") != std::string::npos);
  }
  SUBCASE("too few masked inputs for the quorum")
  {
    Federation f(5);
    f.keys();
    f.shares();
    f.inputs_stage({"site-101", "site-102", "site-103"});
    f.round->close_input(f.now);
    CHECK(f.round->stage() == SecureRound::Stage::failed);
    CHECK(f.round->failure().find("2 masked inputs") != std::string::npos);
  }
  SUBCASE("too few signatures of the survivors")
  {
    Federation f(6);
    f.keys();
    f.shares();
    f.inputs_stage();
    f.round->close_input(f.now);
    f.agree({"site-101", "site-102", "site-103"});
    f.later();
    CHECK(f.round->stage() == SecureRound::Stage::failed);
    CHECK(f.round->failure().find("signed the survivor list") != std::string::npos);
  }
}

TEST_CASE("secure round: a hostile site is dropped, the attempt goes on without it")
{
  SUBCASE("keys signed by another site's key")
  {
    Federation f(5);
    auto advert = f.clients.at("site-102")->advertise();
    advert.index = 1;
    f.round->keys("site-101", SecAggKeys{Federation::task, advert}, f.now);
    CHECK(f.host.dropped.count("site-101") == 1);
  }
  SUBCASE("a masked input not signed by its sender, or of the wrong size")
  {
    Federation f(4);
    f.keys();
    f.shares();
    SecAggInput in;
    in.task = Federation::task;
    in.range = 1;
    in.max_samples = 1;
    const std::vector<std::byte> body(f.length * 4);
    in.signature = sign(f.ids.at("site-102").key, secagg_input_payload(f.round->params(), 1, sha256_hex(body), in));
    CHECK(f.round->input("site-101", in, body));
    CHECK(f.host.dropped.count("site-101") == 1);
    const std::vector<std::byte> short_body(8);
    in.signature =
      sign(f.ids.at("site-102").key, secagg_input_payload(f.round->params(), 2, sha256_hex(short_body), in));
    CHECK(f.round->input("site-102", in, short_body)->find("bytes") != std::string::npos);
  }
  SUBCASE("shares that do not open: the site is accused by its neighbours and everyone it names leaves")
  {
    Federation f(6);
    f.keys();
    f.shares({}, "site-103");
    f.inputs_stage();
    CHECK(f.round->accused() == std::set<std::string>{"site-103"});
    CHECK(f.host.dropped.count("site-103") == 1);
    f.round->close_input(f.now);
    // Every other site complained instead of sending its input: too few inputs remain.
    CHECK(f.round->stage() == SecureRound::Stage::failed);
  }
  SUBCASE("an input after the input stage closed is refused")
  {
    Federation f(4);
    f.keys();
    f.shares();
    f.inputs_stage({"site-104"});
    f.round->close_input(f.now);
    CHECK(f.round->check_input("site-104"));
  }
}

TEST_CASE("secure round: a masked input looks like uniform bytes, even of an all-zero update")
{
  Federation f(4, 64 * 1024);
  for (auto& [name, in] : f.inputs) {
    std::fill(in.begin(), in.end(), 0U);
  }
  f.keys();
  f.shares();
  f.inputs_stage();
  const auto& body = f.bodies.at("site-102");
  REQUIRE(body.size() == 4 * 64 * 1024);
  std::array<double, 256> count{};
  for (const auto b : body) {
    ++count[static_cast<std::uint8_t>(b)];
  }
  const double expected = static_cast<double>(body.size()) / 256;
  double chi2 = 0;
  for (const auto c : count) {
    chi2 += (c - expected) * (c - expected) / expected;
  }
  // 255 degrees of freedom: P(chi2 > 330.5) = 0.001 for uniform bytes.
  CHECK(chi2 < 330.5);
}

TEST_CASE("secure round: t and k for the sites asked")
{
  CHECK_THROWS_AS(secure_shape({}, 2), UsageError);
  CHECK_THROWS_AS(secure_shape({}, SecureAggregationConfig::max_sites + 1), UsageError);
  CHECK(secure_shape({}, 3).threshold == 2);
  CHECK(secure_shape({}, 3).neighbours == 2);
  CHECK(secure_shape({}, 10).neighbours == 9);
  CHECK(secure_shape({}, 10).threshold == 5);
  CHECK(secure_shape({}, 100).neighbours == 16);
  CHECK(secure_shape({0.5, 0, 1}, 10).threshold == 5);
  CHECK(secure_shape({4, 0, 1}, 10).threshold == 4);
  CHECK(secure_shape({0, 5, 1}, 20).neighbours == 6); // an odd degree is taken up to even
  CHECK_THROWS_AS(secure_shape({12, 0, 1}, 10), UsageError);
}

TEST_CASE("secure round: serve refuses what secure aggregation cannot go with")
{
  ServeSettings s;
  s.min_clients = 3;
  s.secure_aggregation = SecureAggregationConfig{};
  CHECK_NOTHROW(s.check_secure_aggregation(10));
  const auto error_of = [](const ServeSettings& x) {
    try {
      x.check_secure_aggregation(10);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  auto median = s;
  median.strategy = parse_strategy("median");
  CHECK(error_of(median).find("median needs every update") != std::string::npos);
  auto clip = s;
  clip.server.clip_norm = 1;
  CHECK(error_of(clip).find("--clip-norm") != std::string::npos);
  auto two = s;
  two.min_clients = 2;
  CHECK(error_of(two).find("at least 3 sites") != std::string::npos);
  CHECK_NOTHROW(s.check_secure_aggregation(SecureAggregationConfig::max_sites));
  CHECK_THROWS_AS(s.check_secure_aggregation(SecureAggregationConfig::max_sites + 1), UsageError);
  auto sampled = s;
  sampled.clients_per_round = 100;
  CHECK_NOTHROW(sampled.check_secure_aggregation(5000)); // 100 of 5000 per round
  sampled.clients_per_round = 0;
  sampled.fraction = 0.5;
  CHECK_THROWS_AS(sampled.check_secure_aggregation(1000), UsageError);
  CHECK(s.to_json().contains("secure_aggregation"));
}

TEST_CASE(
  "secure round: distributed DP's share per site gives the sum at least sigma times a site's sensitivity in words")
{
  for (const std::size_t values : {std::size_t{10}, std::size_t{1000000}, std::size_t{100000000}}) {
    for (const double range : {1.0, 1000.0}) {
      PrivacyConfig dp;
      dp.clip_norm = range;
      dp.noise_multiplier = 0.8;
      secagg::Encoding e{range, 1, 20, 0};
      const std::size_t fewest = 7;
      e.noise = distributed_noise(dp, e, values, fewest);
      const double s = e.scale();
      const double sensitivity = dp.clip_norm * s + std::sqrt(static_cast<double>(values)) / 2; // by hand
      const double in_sum = std::sqrt(static_cast<double>(fewest)) * e.noise * s;
      CHECK(in_sum / sensitivity >= 0.8 * (1 - 1e-12));
      CHECK(in_sum / sensitivity <= 0.8 * 1.01); // not much more than asked
    }
  }
}

TEST_CASE("secure round: the keys stage gives the others twice what the first site took to get its task")
{
  Federation f(4);
  f.now = 20; // the first keys come 20 s after the tasks (a large model, a slow link)
  f.keys({"site-104"});
  f.round->tick(55);
  CHECK(f.round->stage() == SecureRound::Stage::keys); // 20 + 2 × 20 = 60
  f.round->tick(61);
  CHECK(f.round->stage() == SecureRound::Stage::shares);
  CHECK(f.host.dropped.count("site-104") == 1);
}

TEST_CASE("secure round: a complaint about a site that is not the complainer's neighbour drops the complainer only")
{
  Federation f(20); // 19 would be everyone; past 16 sites each has 12 neighbours
  f.keys();
  f.shares();
  const auto& graph = f.round->params();
  const auto neighbours = secagg::neighbour_graph(graph.sites.size(), graph.neighbours, graph.graph_seed)[0];
  std::uint32_t stranger = 0;
  for (std::uint32_t v = 1; v < 20 && stranger == 0; ++v) {
    if (!std::binary_search(neighbours.begin(), neighbours.end(), v)) {
      stranger = v + 1;
    }
  }
  REQUIRE(stranger != 0);
  SecAggInput in;
  in.task = Federation::task;
  in.range = 1;
  in.max_samples = 1;
  in.complaint = stranger;
  const std::vector<std::byte> none;
  in.signature = sign(f.ids.at("site-101").key, secagg_input_payload(f.round->params(), 1, sha256_hex(none), in));
  CHECK(f.round->input("site-101", in, none)->find("not its neighbour") != std::string::npos);
  CHECK(f.host.dropped.count("site-101") == 1);
  CHECK(f.host.dropped.size() == 1);
  CHECK(f.round->accused().empty());
}

TEST_CASE("secure round: a restart may not turn secure aggregation off, lower its threshold, or drop distributed DP")
{
  const json last = {{"threshold", 4}, {"neighbours", 0}, {"range", 1}, {"distributed_dp", true}};
  const auto error_of = [&](const std::optional<SecureAggregationConfig>& now) {
    try {
      check_secure_not_weaker(last, now, 7);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  CHECK(error_of(std::nullopt).find("round 7 ran with secure aggregation") != std::string::npos);
  CHECK(error_of(SecureAggregationConfig{3, 0, 1, true}).find("may not lower it to 3") != std::string::npos);
  CHECK(error_of(SecureAggregationConfig{4, 0, 1, false}).find("keep --distributed-dp") != std::string::npos);
  CHECK(error_of(SecureAggregationConfig{5, 0, 1, true}) == "(accepted)");
  CHECK(error_of(SecureAggregationConfig{0.6, 0, 1, true}) == "(accepted)"); // another kind: not comparable
  const json fraction = {{"threshold", 0.5}, {"distributed_dp", false}};
  CHECK_THROWS_AS(check_secure_not_weaker(fraction, SecureAggregationConfig{0.4, 0, 1, false}, 2), UsageError);
  CHECK_NOTHROW(check_secure_not_weaker(json(), SecureAggregationConfig{}, 2)); // settings unknown: on is enough
}

TEST_CASE("secure round: under client-level DP an input whose signed report does not say it clipped to C is refused")
{
  Federation f(4);
  f.keys();
  f.shares();
  // The attempt asked for no clip: a report that names one does not match it either.
  SecAggInput in;
  in.task = Federation::task;
  in.range = 1;
  in.max_samples = 1;
  in.clip_norm = 1.0;
  const std::vector<std::byte> body(f.length * 4);
  in.signature = sign(f.ids.at("site-101").key, secagg_input_payload(f.round->params(), 1, sha256_hex(body), in));
  CHECK(f.round->input("site-101", in, body)->find("a clip the attempt did not ask for") != std::string::npos);
}
