// SPDX-License-Identifier: Apache-2.0
#include "core/math/noise.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/pki.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <span>

using namespace fedl::core;
using fedl::test::TempDir;
using nlohmann::json;

TEST_CASE("core::PrivacyAccount composes steps and rounds as the accountants do")
{
  PrivacyAccount a;
  CHECK(a.empty());
  CHECK(a.epsilon(1e-5, Accountant::pld_v1).epsilon == 0.0);
  CHECK(a.epsilon(1e-5, Accountant::rdp_v2).epsilon == 0.0);
  a.add(0.01, 1.1, 600);
  a.add(0.01, 1.1, 400);
  const auto direct = compute_epsilon(0.01, 1.1, 1000, 1e-5);
  CHECK(a.epsilon(1e-5, Accountant::rdp_v2).epsilon == doctest::Approx(direct.epsilon).epsilon(1e-12));
  const GaussianSteps part{0.01, 1.1, 1000};
  CHECK(a.epsilon(1e-5, Accountant::pld_v1).epsilon == pld_epsilon({&part, 1}, 1e-5).epsilon);
  CHECK(a.epsilon(1e-5, Accountant::rdp_v1).epsilon ==
        doctest::Approx(compute_epsilon(0.01, 1.1, 1000, 1e-5, legacy_orders()).epsilon).epsilon(1e-12));
  // Round trip through JSON, and the larger of two accounts bounds both.
  const auto back = PrivacyAccount::from_json(a.to_json(), "test");
  CHECK(back.epsilon(1e-5, Accountant::pld_v1).epsilon == a.epsilon(1e-5, Accountant::pld_v1).epsilon);
  PrivacyAccount small;
  small.add(0.01, 1.1, 10);
  small.add(0.02, 2.0, 5);
  small.merge_max(a);
  CHECK(small.parts().size() == 2);
  CHECK(small.epsilon(1e-5, Accountant::pld_v1).epsilon > a.epsilon(1e-5, Accountant::pld_v1).epsilon);
  auto bad = a.to_json();
  bad["mechanisms"][0]["sample_rate"] = 1.5;
  CHECK_THROWS_AS(PrivacyAccount::from_json(bad, "test"), Error);
  bad = a.to_json();
  bad["mechanisms"][0]["steps"] = -1;
  CHECK_THROWS_AS(PrivacyAccount::from_json(bad, "test"), Error);
  CHECK_THROWS_WITH_AS(PrivacyAccount::from_json(json{{"orders", {2}}, {"rdp", {0.1}}}, "test"),
                       doctest::Contains("not a privacy account"), Error);
  // Steps saturate rather than wrap around to fewer.
  PrivacyAccount huge;
  huge.add(0.5, 1.0, UINT64_MAX - 1);
  huge.add(0.5, 1.0, 5);
  CHECK(huge.parts().front().steps == UINT64_MAX);
  // A peer cannot make an account that costs the PLD accountant thousands of spectra.
  json many = json::array();
  for (std::size_t i = 0; i <= PrivacyAccount::max_mechanisms; ++i) {
    many.push_back({{"sample_rate", 0.5}, {"noise_multiplier", 1.0 + static_cast<double>(i)}, {"steps", 1U}});
  }
  CHECK_THROWS_WITH_AS(PrivacyAccount::from_json(json{{"mechanisms", many}}, "test"),
                       doctest::Contains("more than the 64"), Error);
}

TEST_CASE("core::dp_sgd_report: q = batch / samples, refusing q > 1; DpSgdReport reads back and recomputes epsilon")
{
  const DpSgdConfig dp{1.1, 1.0, 1e-5, Accountant::rdp_v2};
  const auto r = dp_sgd_report(dp, 60000, 256, 60 * 235);
  CHECK(r.sample_rate == doctest::Approx(256.0 / 60000));
  CHECK(r.epsilon == doctest::Approx(compute_epsilon(256.0 / 60000, 1.1, 60 * 235, 1e-5).epsilon));
  CHECK_THROWS_AS(dp_sgd_report(dp, 100, 101, 1), UsageError);
  CHECK_THROWS_AS(dp_sgd_report(dp, 0, 1, 1), UsageError);
  auto j = r.to_json();
  j["epsilon"] = 0.001; // a claim: recomputed, not read
  CHECK(DpSgdReport::from_json(j, "test", Accountant::rdp_v2).epsilon == doctest::Approx(r.epsilon));
  for (const char* key : {"noise_multiplier", "max_grad_norm", "sample_rate", "delta"}) {
    auto k = r.to_json();
    k[key] = 0;
    CHECK_THROWS_AS(DpSgdReport::from_json(k, "test", Accountant::rdp_v2), VerifyError);
  }
  auto q = r.to_json();
  q["sample_rate"] = 1.5;
  CHECK_THROWS_AS(DpSgdReport::from_json(q, "test", Accountant::rdp_v2), VerifyError);
}

TEST_CASE("core::DpSgdReport::from_json names a deeply nested value without printing it")
{
  // A site's fedl.dp is JSON text of any nesting: printing it whole recursed once per level and
  // overflowed the stack of the coordinator's validation thread.
  const std::size_t depth = 200000;
  const auto deep = json::parse(std::string(depth, '[') + std::string(depth, ']'));
  CHECK_THROWS_WITH_AS(DpSgdReport::from_json(deep, "fedl.dp", Accountant::pld_v1),
                       doctest::Contains("not a JSON object: (an array of 1 entries, some nested)"), VerifyError);
  auto report = json::parse(R"({"noise_multiplier": -1, "max_grad_norm": 1, "sample_rate": 0.5, "steps": 1,
                                 "delta": 1e-5})");
  CHECK_THROWS_WITH_AS(DpSgdReport::from_json(report, "fedl.dp", Accountant::pld_v1),
                       doctest::Contains("out of range: {\"delta\":1e-05,\"max_grad_norm\":1,"), VerifyError);
  // Parsed, not assigned: copying a json value recurses too.
  const auto nested = json::parse(R"({"noise_multiplier": -1, "max_grad_norm": 1, "sample_rate": 0.5, "steps": 1,
                                      "delta": 1e-5, "note": )" +
                                  std::string(depth, '[') + std::string(depth, ']') + "}");
  CHECK_THROWS_WITH_AS(DpSgdReport::from_json(nested, "fedl.dp", Accountant::pld_v1),
                       doctest::Contains("out of range: (an object of 6 entries, some nested)"), VerifyError);
}

namespace {

void
check_federation_privacy(Accountant accountant)
{
  FederationPrivacy coordinator;
  const DpSgdConfig dp{1.0, 1.0, 1e-5};
  std::vector<json> bodies;
  for (int round = 1; round <= 3; ++round) {
    const ClientDpRound client{0.5, 1.2, 0.5, 1e-5, "secret"};
    const std::map<std::string, DpSgdReport> sites{{"site-1", dp_sgd_report(dp, 500, 50, 10)},
                                                   {"site-2", dp_sgd_report(dp, 1000, 50, 20)}};
    json body = {{"round", round}, {"privacy", coordinator.record_round(client, sites, 20.0, accountant)}};
    bodies.push_back(body);
  }
  CHECK(bodies[0]["privacy"]["accountant"] == accountant_name(accountant));
  CHECK(bodies[0]["privacy"]["client"]["selection"] == "secret");
  CHECK_FALSE(bodies[0]["privacy"].contains("accountant_changed_from"));
  CHECK(bodies[0]["privacy"]["client"].contains("order") == (accountant != Accountant::pld_v1));
  // Three client-level rounds at q = 0.5.
  PrivacyAccount c;
  c.add(0.5, 1.2, 3);
  CHECK(bodies[2]["privacy"]["client"]["epsilon"].get<double>() == c.epsilon(1e-5, accountant).epsilon);
  PrivacyAccount s1;
  s1.add(0.1, 1.0, 30);
  CHECK(bodies[2]["privacy"]["sites"]["site-1"]["total_epsilon"].get<double>() == s1.epsilon(1e-5, accountant).epsilon);

  FederationPrivacy audit;
  for (const auto& b : bodies) {
    CHECK_NOTHROW(audit.replay(b, true));
  }
  CHECK_NOTHROW(audit.finish_verify());
  CHECK(audit.accountant() == accountant);
  CHECK(audit.site_report("site-2")["runs"] == 3);
  CHECK(audit.site_report("site-3").is_null());

  SUBCASE("an altered client epsilon")
  {
    bodies[1]["privacy"]["client"]["epsilon"] = bodies[1]["privacy"]["client"]["epsilon"].get<double>() * 0.9;
    FederationPrivacy a;
    a.replay(bodies[0], true);
    if (accountant == Accountant::pld_v1) { // round 2 is not one the replay recomputes: its last is
      a.replay(bodies[1], true);
      CHECK_THROWS_WITH_AS(a.finish_verify(), doctest::Contains("round 2: privacy.client"), VerifyError);
    } else {
      CHECK_THROWS_WITH_AS(a.replay(bodies[1], true), doctest::Contains("round 2: privacy.client"), VerifyError);
    }
  }
  SUBCASE("an altered site total: by PLD the third round is checked when the replay finishes")
  {
    bodies[2]["privacy"]["sites"]["site-1"]["total_epsilon"] =
      bodies[2]["privacy"]["sites"]["site-1"]["total_epsilon"].get<double>() * 1.01;
    FederationPrivacy a;
    a.replay(bodies[0], true);
    a.replay(bodies[1], true);
    if (accountant == Accountant::pld_v1) {
      a.replay(bodies[2], true);
      CHECK_THROWS_WITH_AS(a.finish_verify(), doctest::Contains("sites.site-1"), VerifyError);
    } else {
      CHECK_THROWS_WITH_AS(a.replay(bodies[2], true), doctest::Contains("sites.site-1"), VerifyError);
    }
  }
  SUBCASE("a total between recomputed rounds below what an earlier round spent")
  {
    bodies[2]["privacy"]["sites"]["site-1"]["total_epsilon"] = 0.01;
    FederationPrivacy a;
    a.replay(bodies[0], true);
    a.replay(bodies[1], true);
    CHECK_THROWS_WITH_AS(a.replay(bodies[2], true), doctest::Contains("sites.site-1"), VerifyError);
  }
  SUBCASE("a round past its recorded budget")
  {
    FederationPrivacy over;
    const ClientDpRound client{0.5, 0.5, 1.0, 1e-5};
    json body = {{"round", 1}, {"privacy", over.record_round(client, {}, 1.0, accountant)}};
    FederationPrivacy a;
    CHECK_THROWS_WITH_AS(a.replay(body, true), doctest::Contains("past the budget"), VerifyError);
  }
  SUBCASE("amplification by sampling claimed for a selection that was not secret")
  {
    for (const char* selection : {"seeded", "all"}) {
      json body = bodies[0];
      body["privacy"]["client"]["selection"] = selection;
      FederationPrivacy a;
      CHECK_THROWS_WITH_AS(a.replay(body, false), doctest::Contains("only a secret one amplifies"), VerifyError);
    }
    json body = bodies[0];
    body["privacy"]["client"]["selection"] = "guessed";
    FederationPrivacy a;
    CHECK_THROWS_WITH_AS(a.replay(body, false), doctest::Contains("is not all, secret or seeded"), VerifyError);
    // Before December 2026 no selection was recorded: still replayed as recorded.
    body["privacy"]["client"].erase("selection");
    CHECK_NOTHROW(a.replay(body, false));
  }
  SUBCASE("an accountant this fedl does not know, or a change that is not recorded")
  {
    FederationPrivacy a;
    json body = bodies[0];
    body["privacy"]["accountant"] = "pld-v9";
    CHECK_THROWS_WITH_AS(a.replay(body, true), doctest::Contains("pld-v9"), VerifyError);
    a.replay(bodies[0], true);
    body = bodies[1];
    body["privacy"]["accountant"] = accountant == Accountant::pld_v1 ? "rdp-v2" : "pld-v1";
    CHECK_THROWS_WITH_AS(a.replay(body, false), doctest::Contains("does not record the change"), VerifyError);
  }
  SUBCASE("a round number that is not one: a VerifyError, not a json error or undefined behaviour")
  {
    for (const json& round : {json(1e300), json("one"), json(true)}) {
      json body = bodies[0];
      body["round"] = round;
      body["privacy"]["client"]["epsilon"] = 0.0;
      FederationPrivacy a;
      CHECK_THROWS_WITH_AS(a.replay(body, true), doctest::Contains("round ?: privacy.client"), VerifyError);
    }
  }
}

} // namespace

TEST_CASE("core::FederationPrivacy records rounds that replay and verify, and catches a wrong epsilon: RDP")
{
  check_federation_privacy(Accountant::rdp_v2);
}

TEST_CASE("core::FederationPrivacy records rounds that replay and verify, and catches a wrong epsilon: PLD")
{
  check_federation_privacy(Accountant::pld_v1);
}

TEST_CASE("core::FederationPrivacy replays a ledger from before accountants were recorded (rdp-v1), then a switch")
{
  // Written by the fedl of November 2026: no "accountant", RDP at TF Privacy's orders.
  PrivacyAccount legacy;
  legacy.add(0.5, 1.2, 1);
  const auto e1 = compute_epsilon(0.5, 1.2, 1, 1e-5, legacy_orders());
  const json old = {{"round", 1},
                    {"privacy",
                     {{"client",
                       {{"clip_norm", 0.5},
                        {"noise_multiplier", 1.2},
                        {"sample_rate", 0.5},
                        {"delta", 1e-5},
                        {"epsilon", e1.epsilon},
                        {"order", e1.order}}}}}};
  FederationPrivacy coordinator;
  coordinator.replay(old, false);
  CHECK(coordinator.accountant() == Accountant::rdp_v1);
  const ClientDpRound client{0.5, 1.2, 0.5, 1e-5, "secret"};
  const json next = {{"round", 2}, {"privacy", coordinator.record_round(client, {}, std::nullopt, Accountant::pld_v1)}};
  CHECK(next["privacy"]["accountant_changed_from"] == "rdp-v1");
  FederationPrivacy audit;
  CHECK_NOTHROW(audit.replay(old, true));
  CHECK_NOTHROW(audit.replay(next, true));
  CHECK_NOTHROW(audit.finish_verify());
}

TEST_CASE("core::SiteAccount keeps a signed account that refuses alterations")
{
  TempDir dir;
  const auto ca = create_ca("test CA", Validity{30});
  const auto site = issue_client_certificate(ca, "site-1", Validity{30});
  const auto other = issue_client_certificate(ca, "site-2", Validity{30});
  const auto path = dir / "privacy.jsonl";
  const DpSgdConfig dp{1.0, 1.0, 1e-5};
  {
    auto a = SiteAccount::open(path, site);
    CHECK_FALSE(a.existed());
    a.append(dp_sgd_report(dp, 500, 50, 10), {{"round", 1}}, Accountant::rdp_v2);
    a.append(dp_sgd_report(dp, 500, 50, 10), {{"round", 2}}, Accountant::pld_v1);
    CHECK(a.runs() == 2);
  }
  const auto a = SiteAccount::open(path, site);
  CHECK(a.existed());
  CHECK(a.runs() == 2);
  CHECK(a.spent().epsilon(1e-5, Accountant::rdp_v2).epsilon ==
        doctest::Approx(compute_epsilon(0.1, 1.0, 20, 1e-5).epsilon));
  const auto text = fedl::test::read_file(path);
  CHECK(text.find(R"("accountant":"pld-v1")") != std::string::npos);

  SUBCASE("a changed number")
  {
    auto t = text;
    const auto at = t.rfind("\"steps\":10");
    REQUIRE(at != std::string::npos);
    t.replace(at, 10, "\"steps\":1 ");
    fedl::test::write_file(path, t);
    CHECK_THROWS_WITH_AS(SiteAccount::open(path, site), doctest::Contains("altered or damaged"), VerifyError);
  }
  SUBCASE("a line removed from the middle")
  {
    const auto first = text.find('\n');
    const auto second = text.find('\n', first + 1);
    fedl::test::write_file(path, text.substr(0, first + 1) + text.substr(second + 1));
    CHECK_THROWS_AS(SiteAccount::open(path, site), VerifyError);
  }
  SUBCASE("an empty file")
  {
    fedl::test::write_file(path, "");
    CHECK_THROWS_WITH_AS(SiteAccount::open(path, site), doctest::Contains("privacy.jsonl"), VerifyError);
  }
  SUBCASE("a last line cut short by a crash is dropped: that run was never sent")
  {
    fedl::test::write_file(path, text + "{\"body\":{\"rep");
    const auto b = SiteAccount::open(path, site);
    CHECK(b.runs() == 2);
    CHECK(fedl::test::read_file(path) == text);
  }
  SUBCASE("another site's key")
  {
    CHECK_THROWS_AS(SiteAccount::open(path, other), VerifyError);
  }
}

TEST_CASE("core::DiscreteGaussianNoise draws N_Z(0, sigma²): its pmf for a small sigma, its moments for large ones")
{
  // sigma = 1.5: the exact pmf P(x) = exp(-x²/(2σ²)) / Σ_y exp(-y²/(2σ²)), chi-square over
  // x in [-6, 6] and the two tails.
  const double sigma = 1.5;
  DiscreteGaussianNoise g(11);
  constexpr int n = 200000;
  std::map<std::int64_t, int> count;
  for (int i = 0; i < n; ++i) {
    ++count[std::clamp<std::int64_t>(g.sample(sigma), -7, 7)];
  }
  double z = 0;
  for (int y = -60; y <= 60; ++y) {
    z += std::exp(-y * y / (2 * sigma * sigma));
  }
  double chi2 = 0;
  for (std::int64_t x = -7; x <= 7; ++x) {
    double p = 0;
    if (x == -7 || x == 7) {
      for (int y = 7; y <= 60; ++y) {
        p += std::exp(-y * y / (2 * sigma * sigma)) / z;
      }
    } else {
      p = std::exp(-static_cast<double>(x * x) / (2 * sigma * sigma)) / z;
    }
    const double expected = p * n;
    chi2 += (count[x] - expected) * (count[x] - expected) / expected;
  }
  // 14 degrees of freedom: P(chi2 > 36.12) = 0.001.
  CHECK(chi2 < 36.12);
  for (const double big : {40.0, 3e6}) {
    double sum = 0, sq = 0;
    constexpr int m = 100000;
    for (int i = 0; i < m; ++i) {
      const auto v = static_cast<double>(g.sample(big));
      sum += v;
      sq += v * v;
    }
    CHECK(std::abs(sum / m) < 5 * big / std::sqrt(m));
    CHECK(std::sqrt(sq / m) == doctest::Approx(big).epsilon(0.02));
  }
  // Modulo 2^32, as a site adds it to its words.
  std::vector<std::uint32_t> words(1000, 0);
  DiscreteGaussianNoise(12).add_to(words, 2.0);
  const auto negative = std::count_if(words.begin(), words.end(), [](std::uint32_t w) { return w > 0x80000000U; });
  const auto zero = std::count(words.begin(), words.end(), 0U);
  CHECK(negative > 300); // P(x < 0) = 0.40 for sigma 2
  CHECK(zero > 130);     // P(0) = 0.20
  CHECK(std::all_of(words.begin(), words.end(), [](std::uint32_t w) { return w < 30 || w > 0xffffffffU - 30; }));
  CHECK_THROWS_AS(g.sample(0), UsageError);
  CHECK_THROWS_AS(g.sample(std::nan("")), UsageError);
  // A fixed seed repeats.
  DiscreteGaussianNoise a(3), b(3);
  for (int i = 0; i < 50; ++i) {
    CHECK(a.sample(7.5) == b.sample(7.5));
  }
}

TEST_CASE("core::GaussianNoise draws N(0, sd²) from a key stream: fixed seeds repeat, the OS's do not")
{
  std::vector<double> x(200001);
  GaussianNoise(7).fill(std::span(x), 1.7);
  double sum = 0, sq = 0, fourth = 0;
  for (const double v : x) {
    REQUIRE(std::isfinite(v));
    sum += v;
  }
  const double mean = sum / static_cast<double>(x.size());
  for (const double v : x) {
    sq += (v - mean) * (v - mean);
    fourth += std::pow(v - mean, 4);
  }
  const double var = sq / static_cast<double>(x.size());
  CHECK(std::abs(mean) < 0.02); // sd of the mean: 1.7 / 447 = 0.004
  CHECK(std::sqrt(var) == doctest::Approx(1.7).epsilon(0.01));
  CHECK(fourth / static_cast<double>(x.size()) / (var * var) ==
        doctest::Approx(3.0).epsilon(0.05)); // Gaussian kurtosis
  std::vector<double> a(9), b(9), c(9), d(9);
  GaussianNoise(7).fill(std::span(a), 1.0);
  GaussianNoise(7).fill(std::span(b), 1.0);
  GaussianNoise(8).fill(std::span(c), 1.0);
  GaussianNoise().fill(std::span(d), 1.0);
  CHECK(a == b);
  CHECK(a != c);
  CHECK(a != d);
  CHECK(a[0] == doctest::Approx(x[0] / 1.7).epsilon(1e-12)); // the same stream, scaled
}

TEST_CASE("core::GaussianNoise's ziggurat: its tables close, and 32 M draws fit the normal in 182 bins and the tails")
{
  // Marsaglia and Tsang's r for 256 layers makes the top layer's area the common area v.
  CHECK(std::abs(ziggurat_closure()) < 1e-12);

  // Bins of 0.05 from −4.5 to 4.5 (the layers' edges lie among them at every scale: a misplaced
  // layer, a wrong wedge test or a wrong tail shows as too many or too few draws in some), and
  // the two tails beyond. Expected counts from erfc; the chi-square statistic of a right sampler
  // has mean 181 and standard deviation 19 (181 degrees of freedom): refused beyond 181 + 6·19.
  constexpr std::size_t n = std::size_t{1} << 25;
  constexpr int bins = 180;
  constexpr double width = 0.05;
  std::vector<double> x(n);
  GaussianNoise(21).fill(std::span(x), 1.0);
  std::vector<double> count(bins + 2, 0.0); // [0]: below −4.5, [bins + 1]: above 4.5
  std::size_t beyond_r = 0, beyond5 = 0, beyond6 = 0;
  for (const double v : x) {
    REQUIRE(std::isfinite(v));
    const double at = std::floor((v + 4.5) / width);
    const auto bin = at < 0 ? 0 : (at >= bins ? bins + 1 : static_cast<int>(at) + 1);
    count[static_cast<std::size_t>(bin)] += 1;
    beyond_r += std::abs(v) > 3.6541528853610088;
    beyond5 += std::abs(v) > 5;
    beyond6 += std::abs(v) > 6;
  }
  const auto below = [](double t) { return 0.5 * std::erfc(-t / std::sqrt(2.0)); }; // Φ(t)
  double chi2 = 0;
  for (int b = 0; b < bins + 2; ++b) {
    const double lo = b == 0 ? -INFINITY : -4.5 + (b - 1) * width;
    const double hi = b == bins + 1 ? INFINITY : -4.5 + b * width;
    const double p = b == 0 ? below(-4.5) : (b == bins + 1 ? below(-4.5) : below(hi) - below(lo));
    const double expected = p * static_cast<double>(n);
    REQUIRE(expected > 20);
    chi2 +=
      (count[static_cast<std::size_t>(b)] - expected) * (count[static_cast<std::size_t>(b)] - expected) / expected;
  }
  CAPTURE(chi2);
  CHECK(chi2 < 181 + 6 * 19);
  // The tail beyond r, where a draw comes from Marsaglia's tail method: P(|z| > r) = 2.58e-4
  // (8660 expected, ±4 standard errors), and further out, counts a Poisson law allows (expected
  // 19.2 beyond 5, 0.066 beyond 6).
  const auto nd = static_cast<double>(n);
  CHECK(static_cast<double>(beyond_r) == doctest::Approx(2 * below(-3.6541528853610088) * nd).epsilon(0.045));
  CHECK(beyond5 >= 5);
  CHECK(beyond5 <= 40);
  CHECK(beyond6 <= 3);
}

TEST_CASE("core::GaussianNoise: add_snapped in float is the fill's draws, added, snapped and scaled; children are "
          "independent and repeat")
{
  const double sd = 0.9;
  const double grid = noise_grid(sd); // 0.03125
  const double scale = 1.0 / 48;
  std::vector<float> in(5000), out(5000);
  for (std::size_t i = 0; i < in.size(); ++i) {
    in[i] = static_cast<float>(std::sin(static_cast<double>(i)) * 3);
  }
  std::vector<double> z(in.size());
  GaussianNoise(31).fill(std::span(z), sd);
  GaussianNoise(31).add_snapped(std::span<const float>(in), std::span(out), sd, scale);
  for (std::size_t i = 0; i < in.size(); ++i) {
    const double snapped = std::nearbyint((static_cast<double>(in[i]) + z[i]) / grid) * grid;
    REQUIRE(out[i] == static_cast<float>(snapped * scale));
  }
  std::vector<float> shorter(10);
  CHECK_THROWS_AS(GaussianNoise(31).add_snapped(std::span<const float>(in), std::span(shorter), sd), Error);

  // Children: a fixed seed's children repeat in order; they differ from each other and from the
  // parent's own draws after them.
  GaussianNoise p(32), q(32);
  auto c1 = p.child(), c2 = p.child(), d1 = q.child();
  std::vector<double> a(64), b(64), c(64), d(64);
  c1.fill(std::span(a), 1.0);
  c2.fill(std::span(b), 1.0);
  d1.fill(std::span(c), 1.0);
  p.fill(std::span(d), 1.0);
  CHECK(a == c);
  CHECK(a != b);
  CHECK(a != d);
  CHECK(b != d);
}

TEST_CASE("core::GaussianNoise::add_snapped: N(0, sd²) on a grid of sd/16 or finer, and no low-order bit of the input")
{
  const double sd = 1.7;
  const double grid = noise_grid(sd);
  CHECK(grid == 0.0625); // the largest power of two <= 1.7 / 16 = 0.106
  CHECK(noise_grid(16.0) == 1.0);
  CHECK_THROWS_AS(noise_grid(0), UsageError);

  std::vector<double> x(400000, 0.3);
  GaussianNoise(9).add_snapped(std::span(x), sd);
  double sum = 0, sq = 0;
  std::size_t beyond2 = 0, beyond3 = 0, beyond4 = 0;
  for (const double v : x) {
    REQUIRE(v / grid == std::nearbyint(v / grid)); // on the grid, exactly
    const double z = (v - 0.3) / sd;
    sum += z;
    sq += z * z;
    beyond2 += std::abs(z) > 2;
    beyond3 += std::abs(z) > 3;
    beyond4 += std::abs(z) > 4;
  }
  const auto n = static_cast<double>(x.size());
  CHECK(std::abs(sum / n) < 5 / std::sqrt(n));
  // Variance: sd² plus the rounding's grid²/12.
  CHECK(sq / n == doctest::Approx(1 + grid * grid / 12 / (sd * sd)).epsilon(0.01));
  // The tails of a normal (two-sided): 4.55%, 0.270%, 0.00633% (400000 draws: ±2%, ±6%, ±30%
  // at about four standard errors).
  CHECK(static_cast<double>(beyond2) / n == doctest::Approx(0.0455).epsilon(0.02));
  CHECK(static_cast<double>(beyond3) / n == doctest::Approx(0.0027).epsilon(0.06));
  CHECK(static_cast<double>(beyond4) / n == doctest::Approx(6.334e-5).epsilon(0.3));

  // Mironov's attack reads x from the low-order bits of x + noise. Two inputs that differ below
  // the grid, with the same noise: unsnapped, every output differs from the other; snapped, they
  // are the same values (a cell boundary lies between them with probability 1e-12 / grid each).
  std::vector<double> a(1000, 0.3), b(1000, 0.3 + 1e-12), raw_a(1000), raw_b(1000);
  GaussianNoise(4).add_snapped(std::span(a), sd);
  GaussianNoise(4).add_snapped(std::span(b), sd);
  CHECK(a == b);
  GaussianNoise(4).fill(std::span(raw_a), sd);
  GaussianNoise(4).fill(std::span(raw_b), sd);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < raw_a.size(); ++i) {
    differ += (0.3 + raw_a[i]) != (0.3 + 1e-12 + raw_b[i]);
  }
  CHECK(differ == raw_a.size());
}
