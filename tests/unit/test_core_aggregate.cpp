// SPDX-License-Identifier: Apache-2.0
#include "core/math/aggregate.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

// The test model: "layer.weight" [2,3] and "layer.bias" [2], 8 coordinates, written as one flat
// vector (weight first, then bias). Note that the file stores the bias first (sorted by name).
const std::vector<std::int64_t> k_weight_shape{2, 3};
const std::vector<std::int64_t> k_bias_shape{2};

std::span<const std::byte>
bytes_of(const std::vector<float>& v)
{
  return std::as_bytes(std::span(v));
}

void
write_model(const std::filesystem::path& path, const std::vector<float>& flat, const Metadata& meta)
{
  REQUIRE(flat.size() == 8);
  const std::vector<float> w(flat.begin(), flat.begin() + 6);
  const std::vector<float> b(flat.begin() + 6, flat.end());
  const std::vector<TensorView> tensors{
    {"layer.weight", DType::f32, k_weight_shape, bytes_of(w)},
    {"layer.bias", DType::f32, k_bias_shape, bytes_of(b)},
  };
  write_safetensors(path, tensors, meta);
}

std::vector<float>
floats(const OwnedTensor& t)
{
  std::vector<float> out(t.bytes.size() / sizeof(float));
  std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  return out;
}

// The aggregate's tensors as one flat vector, weight then bias.
std::vector<float>
flat(const std::vector<OwnedTensor>& tensors)
{
  std::vector<float> out;
  for (const char* name : {"layer.weight", "layer.bias"}) {
    const auto it = std::find_if(tensors.begin(), tensors.end(), [&](const OwnedTensor& t) { return t.name == name; });
    REQUIRE(it != tensors.end());
    const auto v = floats(*it);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

std::vector<float>
constant(float x)
{
  return std::vector<float>(8, x);
}

// A base model file and updates of it, in a private folder.
class Round
{
public:
  explicit Round(const std::vector<float>& base)
  {
    write_model(m_dir / "base.safetensors", base, {{"fedl.kind", "model"}});
    m_base = std::make_unique<SafetensorsFile>(m_dir / "base.safetensors");
  }

  const SafetensorsFile& base() const { return *m_base; }
  std::string base_sha() const { return m_base->sha256(); }
  const std::filesystem::path& dir() const { return m_dir.path(); }

  // Writes an update file with Δ = `delta` and returns its path (also opened and kept).
  std::filesystem::path add(const std::vector<float>& delta, const std::string& samples = "1")
  {
    const auto path = m_dir / fmt::format("u{}.safetensors", m_files.size());
    write_model(path, delta,
                {{"fedl.kind", "update"}, {"fedl.base_sha256", base_sha()}, {"fedl.num_samples", samples}});
    m_files.push_back(std::make_unique<SafetensorsFile>(path));
    return path;
  }

  std::vector<const SafetensorsFile*> files() const
  {
    std::vector<const SafetensorsFile*> out;
    for (const auto& f : m_files) {
      out.push_back(f.get());
    }
    return out;
  }

  std::vector<float> run(const std::string& spec, const std::vector<double>& weights, const ServerOptions& options,
                         ServerState& state, AggregateInfo* info = nullptr) const
  {
    const auto files = this->files();
    return flat(aggregate(*m_base, files, weights, parse_strategy(spec), options, state, info));
  }

  std::vector<float> run(const std::string& spec, const std::vector<double>& weights, ServerOptions options = {}) const
  {
    ServerState state;
    return run(spec, weights, options, state);
  }

private:
  TempDir m_dir;
  std::unique_ptr<SafetensorsFile> m_base;
  std::vector<std::unique_ptr<SafetensorsFile>> m_files;
};

const std::vector<float> k_base{1.0F, 2.0F, 3.0F, 4.0F, 5.0F, 6.0F, 7.0F, 8.0F};

void
check_close(const std::vector<float>& got, const std::vector<double>& want, double eps = 1e-6)
{
  REQUIRE(got.size() == want.size());
  for (std::size_t j = 0; j < got.size(); ++j) {
    INFO("coordinate " << j);
    CHECK(static_cast<double>(got[j]) == doctest::Approx(want[j]).epsilon(eps));
  }
}

std::vector<double>
plus(const std::vector<float>& base, double d)
{
  std::vector<double> out;
  for (const auto b : base) {
    out.push_back(static_cast<double>(b) + d);
  }
  return out;
}

} // namespace

TEST_SUITE_BEGIN("aggregate");

TEST_CASE("aggregate: parse_strategy reads every form and round-trips through to_string")
{
  CHECK(parse_strategy("fedavg").kind == Strategy::fedavg);
  CHECK(parse_strategy("fedavgm").kind == Strategy::fedavgm);
  CHECK(parse_strategy("fedadam").kind == Strategy::fedadam);
  CHECK(parse_strategy("fedyogi").kind == Strategy::fedyogi);
  CHECK(parse_strategy("fedadagrad").kind == Strategy::fedadagrad);
  CHECK(parse_strategy("median").kind == Strategy::median);
  const auto t = parse_strategy("trimmed-mean:0.1");
  CHECK(t.kind == Strategy::trimmed_mean);
  CHECK(t.trim == 0.1);
  CHECK(parse_strategy("trimmed-mean:0").trim == 0.0);
  const auto k = parse_strategy("krum:2");
  CHECK(k.kind == Strategy::krum);
  CHECK(k.byzantine == 2);
  const auto mk = parse_strategy("multi-krum:1,3");
  CHECK(mk.kind == Strategy::multi_krum);
  CHECK(mk.byzantine == 1);
  CHECK(mk.select == 3);
  for (const char* s : {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed-mean:0.25",
                        "krum:0", "multi-krum:2,5"}) {
    CHECK(parse_strategy(s).to_string() == s);
    CHECK(parse_strategy(parse_strategy(s).to_string()) == parse_strategy(s));
  }
  CHECK(parse_strategy("fedadam").stateful());
  CHECK_FALSE(parse_strategy("median").stateful());
  CHECK(parse_strategy("multi-krum:1,2").weighted());
  CHECK_FALSE(parse_strategy("krum:1").weighted());
  CHECK_FALSE(parse_strategy("trimmed-mean:0.1").weighted());
}

TEST_CASE("aggregate: parse_strategy refuses bad specs with exit 2, naming the spec and the valid forms")
{
  for (const char* s : {"", "fedsgd", "FedAvg", "fedavg:1", "median:2", "trimmed-mean", "trimmed-mean:0.5",
                        "trimmed-mean:-0.1", "trimmed-mean:nan", "trimmed-mean:0.1x", "krum", "krum:", "krum:-1",
                        "krum:1.5", "multi-krum:1", "multi-krum:1,0", "multi-krum:,2", "multi-krum:1,2,3"}) {
    INFO("spec '" << s << "'");
    try {
      parse_strategy(s);
      FAIL("accepted");
    } catch (const UsageError& e) {
      CHECK(e.code() == ExitCode::usage);
      const std::string msg = e.what();
      CHECK(msg.find(fmt::format("'{}'", s)) != std::string::npos);
      CHECK(msg.find("trimmed-mean:BETA") != std::string::npos);
      CHECK(msg.find("multi-krum:F,M") != std::string::npos);
    }
  }
}

TEST_CASE("aggregate: server options out of range are usage errors naming the flag")
{
  const auto bad = [](ServerOptions o, const char* flag) {
    try {
      validate_server_options(o);
      FAIL("accepted");
    } catch (const UsageError& e) {
      CHECK(std::string(e.what()).find(flag) != std::string::npos);
    }
  };
  validate_server_options({});
  ServerOptions o;
  o.optimizer.lr = 0;
  bad(o, "--server-lr");
  o = {};
  o.optimizer.momentum = 1.0;
  bad(o, "--server-momentum");
  o = {};
  o.optimizer.beta1 = -0.1;
  bad(o, "--beta1");
  o = {};
  o.optimizer.beta2 = std::nan("");
  bad(o, "--beta2");
  o = {};
  o.optimizer.tau = 0;
  bad(o, "--tau");
  o = {};
  o.clip_norm = -1.0;
  bad(o, "--clip-norm");
}

TEST_CASE("aggregate: fedavg weights by num_samples exactly, and one update with server_lr 1 is base + delta")
{
  Round r(k_base);
  r.add(constant(1.0F), "1");
  r.add(constant(5.0F), "3");
  // (1·1 + 3·5) / 4 = 4, exactly.
  const auto got = r.run("fedavg", {1.0, 3.0});
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(got[j] == k_base[j] + 4.0F);
  }
  // Per coordinate: weights 1 and 3 on values that give exact binary fractions.
  Round r2(k_base);
  r2.add({0.5F, -1.0F, 2.0F, 0.0F, 8.0F, -4.0F, 1.0F, 0.25F}, "1");
  r2.add({-0.5F, 3.0F, 2.0F, 4.0F, 0.0F, 4.0F, -3.0F, 0.25F}, "3");
  const auto got2 = r2.run("fedavg", {1.0, 3.0});
  const std::vector<float> want2{1.0F - 0.25F, 2.0F + 2.0F, 3.0F + 2.0F, 4.0F + 3.0F,
                                 5.0F + 2.0F,  6.0F + 2.0F, 7.0F - 2.0F, 8.0F + 0.25F};
  CHECK(got2 == want2);
  // The overload for a vector of opened files gives the same.
  std::vector<SafetensorsFile> opened;
  opened.emplace_back(r.dir() / "u0.safetensors");
  opened.emplace_back(r.dir() / "u1.safetensors");
  ServerState none;
  CHECK(flat(aggregate(r.base(), opened, std::vector<double>{1.0, 3.0}, parse_strategy("fedavg"), {}, none)) == got);
  // server_lr 0.5 halves the step.
  ServerOptions half;
  half.optimizer.lr = 0.5;
  const auto got3 = r.run("fedavg", {1.0, 3.0}, half);
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(got3[j] == k_base[j] + 2.0F);
  }
  // One update: the result is base + Δ, the float sum, bit for bit.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-3.0F, 3.0F);
  std::vector<float> base(8);
  std::vector<float> delta(8);
  for (std::size_t j = 0; j < 8; ++j) {
    base[j] = dist(rng);
    delta[j] = dist(rng) * 0.01F;
  }
  Round r4(base);
  r4.add(delta, "17");
  const auto got4 = r4.run("fedavg", {17.0});
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(got4[j] == base[j] + delta[j]);
  }
}

TEST_CASE("aggregate: fedavgm carries its momentum buffer across rounds through the state file")
{
  // Hsu et al. 2019: m ← μm + Δ̄, x ← x + ηm. μ = 0.9, η = 1.
  ServerOptions o;
  o.optimizer.momentum = 0.9;
  ServerState state;
  Round r1(k_base);
  r1.add(constant(1.0F), "1");
  r1.add(constant(3.0F), "1");
  const auto x1 = r1.run("fedavgm", {1.0, 1.0}, o, state); // Δ̄ = 2, m = 2
  check_close(x1, plus(k_base, 2.0));
  CHECK(state.strategy == "fedavgm");
  CHECK(state.round == 1);
  CHECK(state.v.empty());
  save_server_state(r1.dir() / "state.safetensors", state);

  Round r2(x1);
  r2.add(constant(-1.0F), "5");
  std::vector<TensorView> params = r2.base().content().tensors;
  ServerState loaded = load_server_state(r1.dir() / "state.safetensors", parse_strategy("fedavgm"), params);
  CHECK(loaded.round == 1);
  const auto x2 = r2.run("fedavgm", {5.0}, o, loaded); // m = 0.9·2 − 1 = 0.8
  check_close(x2, plus(x1, 0.8));
  CHECK(loaded.round == 2);
  CHECK(floats(loaded.m[0])[0] == doctest::Approx(0.8));

  // μ = 0 is plain FedAvg.
  ServerOptions zero;
  zero.optimizer.momentum = 0.0;
  ServerState s0;
  CHECK(r1.run("fedavgm", {1.0, 1.0}, zero, s0) == r1.run("fedavg", {1.0, 1.0}));
}

namespace {

// One coordinate of Reddi et al. 2021, Algorithm 2, worked by hand for the tests: v starts at τ²
// (as a float, the parameters' dtype) and m at 0; state is stored as float between rounds.
struct Adaptive
{
  std::string kind;
  double beta1 = 0.9, beta2 = 0.99, tau = 1e-3, lr = 0.1;
  double m = 0.0;
  double v = static_cast<double>(static_cast<float>(1e-6));

  double step(double d)
  {
    const double m1 = beta1 * m + (1 - beta1) * d;
    double v1 = 0;
    if (kind == "fedadam") {
      v1 = beta2 * v + (1 - beta2) * d * d;
    } else if (kind == "fedyogi") {
      const double s = v - d * d > 0 ? 1.0 : (v - d * d < 0 ? -1.0 : 0.0);
      v1 = v - (1 - beta2) * d * d * s;
    } else {
      v1 = v + d * d;
    }
    const double x = lr * m1 / (std::sqrt(v1) + tau);
    m = static_cast<float>(m1);
    v = static_cast<float>(v1);
    return x;
  }
};

} // namespace

TEST_CASE("aggregate: fedadam, fedyogi and fedadagrad follow Reddi et al. over two rounds with state carried")
{
  for (const char* kind : {"fedadam", "fedyogi", "fedadagrad"}) {
    INFO(kind);
    ServerOptions o;
    o.optimizer.lr = 0.1;
    Adaptive ref{kind};
    ServerState state;

    Round r1(k_base);
    r1.add(constant(1.0F), "1");
    r1.add(constant(2.0F), "3"); // Δ̄ = 1.75
    const auto x1 = r1.run(kind, {1.0, 3.0}, o, state);
    const double step1 = ref.step(1.75);
    check_close(x1, plus(k_base, step1));
    CHECK(state.round == 1);
    REQUIRE(state.v.size() == 2);
    save_server_state(r1.dir() / "state.safetensors", state);

    // Round 2: a small update of the other sign. For fedyogi, v − Δ̄² > 0 now: v shrinks.
    Round r2(x1);
    r2.add(constant(-0.05F), "2");
    ServerState loaded =
      load_server_state(r1.dir() / "state.safetensors", parse_strategy(kind), r2.base().content().tensors);
    const auto x2 = r2.run(kind, {2.0}, o, loaded);
    const double step2 = ref.step(static_cast<double>(-0.05F));
    check_close(x2, plus(x1, step2));
    CHECK(loaded.round == 2);
    CHECK(static_cast<double>(floats(loaded.m[0])[0]) == doctest::Approx(ref.m).epsilon(1e-6));
    CHECK(static_cast<double>(floats(loaded.v[0])[0]) == doctest::Approx(ref.v).epsilon(1e-6));
  }
  // The first step of fedadam with Δ̄ = 1.75 and η = 0.1, by hand: m = 0.175,
  // v = 0.99·τ² + 0.01·1.75² = 0.03062599, x − base = 0.1·0.175 / (0.17500283 + 0.001) = 0.0994302.
  Adaptive adam{"fedadam"};
  CHECK(adam.step(1.75) == doctest::Approx(0.0994302).epsilon(1e-6));
}

TEST_CASE("aggregate: coordinate-wise median, odd and even, ignores the weights")
{
  Round r(k_base);
  r.add({1, 9, -3, 0, 0, 5, 2, 7});
  r.add({3, 1, -1, 0, 1, 5, 8, 7});
  r.add({2, 5, -2, 4, 100, 5, -6, 7});
  const auto odd = r.run("median", {1.0, 1000.0, 1.0});
  const std::vector<float> mid_odd{2, 5, -2, 0, 1, 5, 2, 7};
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(odd[j] == k_base[j] + mid_odd[j]);
  }
  r.add({10, 2, 0, 1, -100, 5, 3, 6});
  // Sorted columns: {1,2,3,10} → 2.5; {1,2,5,9} → 3.5; {-3,-2,-1,0} → -1.5; {0,0,1,4} → 0.5;
  // {-100,0,1,100} → 0.5; {5,5,5,5} → 5; {-6,2,3,8} → 2.5; {6,7,7,7} → 7.
  const auto even = r.run("median", {1.0, 1.0, 1.0, 50.0});
  const std::vector<float> mid_even{2.5F, 3.5F, -1.5F, 0.5F, 0.5F, 5, 2.5F, 7};
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(even[j] == k_base[j] + mid_even[j]);
  }
}

TEST_CASE("aggregate: trimmed mean drops floor(BETA·N) values at each end per coordinate")
{
  Round r(k_base);
  r.add({1, 10, 0, 0, 0, 0, 0, 0});
  r.add({2, 20, 0, 0, 0, 0, 0, 0});
  r.add({3, 30, 0, 0, 0, 0, 0, 0});
  r.add({4, -50, 0, 0, 0, 0, 0, 0});
  r.add({1000, 40, 0, 0, 0, 0, 0, 0});
  // N = 5, BETA = 0.2: drop one at each end. Column 0 keeps {2,3,4} → 3; column 1 keeps {10,20,30} → 20.
  const auto got = r.run("trimmed-mean:0.2", {1, 1, 1, 1, 1});
  CHECK(got[0] == k_base[0] + 3.0F);
  CHECK(got[1] == k_base[1] + 20.0F);
  CHECK(got[2] == k_base[2]);
  // BETA = 0.1: floor(0.5) = 0, nothing dropped: the unweighted mean, whatever the weights.
  const auto none = r.run("trimmed-mean:0.1", {5, 1, 1, 1, 1});
  CHECK(none[0] == doctest::Approx(1.0 + 1010.0 / 5.0));
  CHECK(none[1] == doctest::Approx(2.0 + 50.0 / 5.0));
  // BETA = 0.4: floor(2) = 2 dropped at each end: the median.
  CHECK(r.run("trimmed-mean:0.4", {1, 1, 1, 1, 1}) == r.run("median", {1, 1, 1, 1, 1}));
}

TEST_CASE("aggregate: trimmed-mean:0.29 of 100 updates drops 29 at each end (binary rounding of 0.29·100 aside)")
{
  // In memory, without files: one coordinate, values 0..70 and 29 huge ones, shuffled.
  std::vector<float> values;
  for (int i = 0; i < 100; ++i) {
    values.push_back(i < 71 ? static_cast<float>(i) : 1000.0F + static_cast<float>(i));
  }
  std::shuffle(values.begin(), values.end(), std::mt19937(9));
  const std::vector<float> zero{0.0F};
  Safetensors base;
  base.tensors.push_back({"p", DType::f32, {1}, bytes_of(zero)});
  std::vector<Safetensors> updates(100);
  for (std::size_t i = 0; i < 100; ++i) {
    updates[i].tensors.push_back({"p", DType::f32, {1}, std::as_bytes(std::span(&values[i], 1))});
  }
  ServerState state;
  const auto out =
    aggregate(base, updates, std::vector<double>(100, 1.0), parse_strategy("trimmed-mean:0.29"), {}, state);
  // Kept: 29..70, mean 49.5 (dropping only 28 would keep 28 and 1071).
  CHECK(floats(out[0])[0] == 49.5F);
}

TEST_CASE("aggregate: krum takes the update closest to its neighbours and multi-krum averages the best M")
{
  // Honest updates 10, 11, 12, 13 in every coordinate, one attacker at 100. F = 1: each update
  // is scored by its N − F − 2 = 2 nearest neighbours. Squared distances per coordinate: 1 between
  // neighbours, 4 two apart. Scores (× 8 coordinates): 10 → 1+4, 11 → 1+1, 12 → 1+1, 13 → 1+4.
  Round r(k_base);
  r.add(constant(10));
  r.add(constant(11), "2");
  r.add(constant(12));
  r.add(constant(13));
  r.add(constant(100), "1000");
  ServerState state;
  AggregateInfo info;
  const auto got = r.run("krum:1", {1, 2, 1, 1, 1000}, {}, state, &info);
  // 11 and 12 tie; the one listed first wins.
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(got[j] == k_base[j] + 11.0F);
  }
  REQUIRE(info.selected.size() == 1);
  CHECK(info.selected[0] == 1);
  REQUIRE(info.krum_scores.size() == 5);
  CHECK(info.krum_scores[0] == 40.0);
  CHECK(info.krum_scores[1] == 16.0);
  CHECK(info.krum_scores[2] == 16.0);
  CHECK(info.krum_scores[3] == 40.0);
  CHECK(info.krum_scores[4] > 1e4);

  // multi-krum:1,3 picks 11, 12 and then 10 (tied with 13, listed first), averaged by samples:
  // (2·11 + 1·12 + 1·10) / 4 = 11.
  const auto mk = r.run("multi-krum:1,3", {1, 2, 1, 1, 1000}, {}, state, &info);
  CHECK(info.selected == std::vector<std::size_t>{1, 2, 0});
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(mk[j] == k_base[j] + 11.0F);
  }
  // With weights 1, 1, 5 on the chosen three: (11 + 12 + 5·10) / 7.
  const auto mk2 = r.run("multi-krum:1,3", {5, 1, 1, 1, 1}, {}, state, &info);
  check_close(mk2, plus(k_base, 73.0 / 7.0));

  // Too few updates for F, or M past N − F: a run-time error (exit 1).
  CHECK_THROWS_AS(r.run("krum:3", {1, 1, 1, 1, 1}), Error);
  CHECK_THROWS_AS(r.run("multi-krum:1,5", {1, 1, 1, 1, 1}), Error);
  CHECK_NOTHROW(r.run("multi-krum:1,4", {1, 1, 1, 1, 1}));
}

TEST_CASE("aggregate: --clip-norm scales each update to L2 norm at most C before aggregating")
{
  Round r(k_base);
  r.add({3, 0, 0, 0, 0, 0, 0, 4});    // norm 5 (over both tensors): scaled by 1/5
  r.add({0.5F, 0, 0, 0, 0, 0, 0, 0}); // norm 0.5: left alone
  ServerOptions o;
  o.clip_norm = 1.0;
  ServerState state;
  AggregateInfo info;
  const auto got = r.run("fedavg", {1, 1}, o, state, &info);
  check_close(got, {1 + (0.6 + 0.5) / 2, 2, 3, 4, 5, 6, 7, 8 + 0.8 / 2});
  REQUIRE(info.norms.size() == 2);
  CHECK(info.norms[0] == doctest::Approx(5.0));
  CHECK(info.norms[1] == doctest::Approx(0.5));
  CHECK(info.clipped == std::vector<bool>{true, false});
  // The robust rules see the clipped values too: median of {0.6, 0.5} per coordinate is 0.55.
  const auto med = r.run("median", {1, 1}, o, state);
  CHECK(med[0] == doctest::Approx(1.55));
  CHECK(med[7] == doctest::Approx(8.4));
  CHECK(update_norm(r.files()[0]->content()) == doctest::Approx(5.0));
}

TEST_CASE("aggregate: validate_update says what is wrong with an update, without throwing")
{
  TempDir dir;
  write_model(dir / "base.safetensors", k_base, {{"fedl.kind", "model"}});
  const SafetensorsFile base(dir / "base.safetensors");
  const auto sha = base.sha256();
  const auto check = [&](const std::vector<TensorView>& tensors, const Metadata& meta) -> std::optional<std::string> {
    write_safetensors(dir / "u.safetensors", tensors, meta);
    const SafetensorsFile u(dir / "u.safetensors");
    return validate_update(base.content(), sha, u.content());
  };
  const Metadata good{{"fedl.kind", "update"}, {"fedl.base_sha256", sha}, {"fedl.num_samples", "12"}};
  std::vector<float> w(6, 0.5F);
  std::vector<float> b(2, 0.25F);
  const std::vector<TensorView> ok{{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)},
                                   {"layer.bias", DType::f32, k_bias_shape, bytes_of(b)}};
  CHECK_FALSE(check(ok, good).has_value());

  const auto has = [](const std::optional<std::string>& reason, std::initializer_list<const char*> words) {
    REQUIRE(reason.has_value());
    for (const char* word : words) {
      INFO(*reason);
      CHECK(reason->find(word) != std::string::npos);
    }
  };
  auto meta = good;
  meta["fedl.base_sha256"] = std::string(64, 'a');
  has(check(ok, meta), {"fedl.base_sha256", "aaaa", sha.c_str(), "another model"});
  meta = good;
  meta.erase("fedl.base_sha256");
  has(check(ok, meta), {"fedl.base_sha256"});
  meta = good;
  meta["fedl.kind"] = "model";
  has(check(ok, meta), {"fedl.kind", "'model'", "'update'"});
  meta = good;
  meta.erase("fedl.kind");
  has(check(ok, meta), {"fedl.kind"});
  for (const char* samples : {"0", "abc", "-3", "1.5", "", " 4", "99999999999999999999999"}) {
    meta = good;
    meta["fedl.num_samples"] = samples;
    has(check(ok, meta), {"fedl.num_samples", "positive integer"});
  }
  meta = good;
  meta.erase("fedl.num_samples");
  has(check(ok, meta), {"fedl.num_samples"});

  // Structure: wrong shape, missing tensor, extra tensor, other dtype.
  has(check({{"layer.weight", DType::f32, {3, 2}, bytes_of(w)}, {"layer.bias", DType::f32, k_bias_shape, bytes_of(b)}},
            good),
      {"layer.weight", "[3,2]", "[2,3]"});
  has(check({{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)}}, good), {"layer.bias", "missing"});
  std::vector<float> extra(1, 0.0F);
  has(check({ok[0], ok[1], {"layer.extra", DType::f32, {1}, bytes_of(extra)}}, good),
      {"layer.extra", "not in the base"});
  std::vector<double> b64(2, 0.25);
  has(check({ok[0], {"layer.bias", DType::f64, k_bias_shape, std::as_bytes(std::span(b64))}}, good),
      {"layer.bias", "F64", "F32"});

  // Values: NaN and Inf name the tensor, the count and the first index.
  auto wn = w;
  wn[4] = std::numeric_limits<float>::quiet_NaN();
  has(check({{"layer.weight", DType::f32, k_weight_shape, bytes_of(wn)}, ok[1]}, good),
      {"layer.weight", "1 non-finite value", "index 4", "NaN"});
  auto bi = b;
  bi[0] = std::numeric_limits<float>::infinity();
  bi[1] = -std::numeric_limits<float>::infinity();
  has(check({ok[0], {"layer.bias", DType::f32, k_bias_shape, bytes_of(bi)}}, good),
      {"layer.bias", "2 non-finite values", "index 0", "infinite"});

  // Through the mapped-file overload, on a tensor read in several chunks.
  {
    const std::size_t big = 600'000;
    std::vector<float> base_big(big, 1.0F);
    write_safetensors(dir / "big.safetensors",
                      {{{"p", DType::f32, {static_cast<std::int64_t>(big)}, bytes_of(base_big)}}},
                      {{"fedl.kind", "model"}});
    const SafetensorsFile big_base(dir / "big.safetensors");
    auto d = std::vector<float>(big, 0.5F);
    d[300'001] = std::numeric_limits<float>::infinity();
    d[599'999] = std::numeric_limits<float>::quiet_NaN();
    write_safetensors(dir / "bigu.safetensors", {{{"p", DType::f32, {static_cast<std::int64_t>(big)}, bytes_of(d)}}},
                      {{"fedl.kind", "update"}, {"fedl.base_sha256", big_base.sha256()}, {"fedl.num_samples", "3"}});
    const SafetensorsFile bigu(dir / "bigu.safetensors");
    has(validate_update(big_base.content(), big_base.sha256(), bigu),
        {"tensor p", "2 non-finite values", "index 300001", "infinite"});
    d[300'001] = 0.0F;
    d[599'999] = 0.0F;
    write_safetensors(dir / "bigu.safetensors", {{{"p", DType::f32, {static_cast<std::int64_t>(big)}, bytes_of(d)}}},
                      {{"fedl.kind", "update"}, {"fedl.base_sha256", big_base.sha256()}, {"fedl.num_samples", "3"}});
    const SafetensorsFile bigu2(dir / "bigu.safetensors");
    CHECK_FALSE(validate_update(big_base.content(), big_base.sha256(), bigu2).has_value());
  }

  // An F64 model validates F64 updates the same way.
  std::vector<double> base64(3, 1.0);
  write_safetensors(dir / "base64.safetensors", {{{"p", DType::f64, {3}, std::as_bytes(std::span(base64))}}},
                    {{"fedl.kind", "model"}});
  const SafetensorsFile b64file(dir / "base64.safetensors");
  std::vector<double> d64{0.0, std::nan(""), 1.0};
  write_safetensors(dir / "u64.safetensors", {{{"p", DType::f64, {3}, std::as_bytes(std::span(d64))}}},
                    {{"fedl.kind", "update"}, {"fedl.base_sha256", b64file.sha256()}, {"fedl.num_samples", "1"}});
  const SafetensorsFile u64(dir / "u64.safetensors");
  has(validate_update(b64file.content(), b64file.sha256(), u64.content()), {"tensor p", "index 1", "NaN"});
}

TEST_CASE("aggregate: num_samples is read as a positive integer")
{
  Safetensors s;
  s.metadata["fedl.num_samples"] = "42";
  CHECK(update_num_samples(s) == 42U);
  s.metadata["fedl.num_samples"] = "+42";
  CHECK_FALSE(update_num_samples(s).has_value());
  s.metadata["fedl.num_samples"] = "9007199254740993"; // 2^53 + 1: no longer exact as a weight
  CHECK_FALSE(update_num_samples(s).has_value());
  s.metadata.clear();
  CHECK_FALSE(update_num_samples(s).has_value());
}

TEST_CASE("aggregate: server state round-trips through its file, and a mismatch is a verification error")
{
  Round r(k_base);
  r.add(constant(0.5F));
  ServerState state;
  ServerOptions o;
  o.optimizer.lr = 0.01;
  r.run("fedyogi", {1}, o, state);
  r.run("fedyogi", {1}, o, state);
  CHECK(state.round == 2);
  const auto path = r.dir() / "state.safetensors";
  save_server_state(path, state);
  const auto& params = r.base().content().tensors;
  const auto loaded = load_server_state(path, parse_strategy("fedyogi"), params);
  CHECK(loaded.strategy == "fedyogi");
  CHECK(loaded.round == 2);
  REQUIRE(loaded.m.size() == state.m.size());
  REQUIRE(loaded.v.size() == state.v.size());
  for (std::size_t k = 0; k < state.m.size(); ++k) {
    CHECK(loaded.m[k].name == state.m[k].name);
    CHECK(loaded.m[k].bytes == state.m[k].bytes);
    CHECK(loaded.v[k].bytes == state.v[k].bytes);
  }
  // The file is plain safetensors with m.<param> / v.<param> tensors and the metadata.
  const SafetensorsFile raw(path);
  CHECK(raw.content().find("m.layer.weight") != nullptr);
  CHECK(raw.content().find("v.layer.bias") != nullptr);
  CHECK(raw.content().meta("fedl.strategy") == "fedyogi");
  CHECK(raw.content().meta("fedl.round") == "2");
  CHECK(raw.content().meta("fedl.kind") == "server-state");

  // Another strategy's state.
  CHECK_THROWS_AS(load_server_state(path, parse_strategy("fedadam"), params), VerifyError);
  // Other parameters: another shape, another name.
  std::vector<float> w(6);
  std::vector<float> b(3);
  const std::vector<TensorView> other_shape{{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)},
                                            {"layer.bias", DType::f32, {3}, bytes_of(b)}};
  try {
    load_server_state(path, parse_strategy("fedyogi"), other_shape);
    FAIL("accepted");
  } catch (const VerifyError& e) {
    CHECK(std::string(e.what()).find("layer.bias") != std::string::npos);
  }
  const std::vector<TensorView> other_name{{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)},
                                           {"head.bias", DType::f32, {2}, bytes_of(b)}};
  CHECK_THROWS_AS(load_server_state(path, parse_strategy("fedyogi"), other_name), VerifyError);
  const std::vector<TensorView> fewer{{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)}};
  CHECK_THROWS_AS(load_server_state(path, parse_strategy("fedyogi"), fewer), VerifyError);
  // A model file is not a state file; a stateless strategy has no state to load.
  CHECK_THROWS_AS(load_server_state(r.dir() / "base.safetensors", parse_strategy("fedyogi"), params), VerifyError);
  CHECK_THROWS_AS(load_server_state(path, parse_strategy("median"), params), UsageError);
  CHECK_THROWS_AS(load_server_state(r.dir() / "absent.safetensors", parse_strategy("fedyogi"), params), Error);

  // aggregate refuses state of another strategy and leaves it unchanged.
  ServerState copy = state;
  CHECK_THROWS_AS(r.run("fedadam", {1}, o, copy), VerifyError);
  CHECK(copy.round == 2);
  CHECK(copy.m[0].bytes == state.m[0].bytes);
}

TEST_CASE("aggregate: input errors")
{
  Round r(k_base);
  r.add(constant(1.0F));
  ServerState state;
  const auto files = r.files();
  const auto spec = parse_strategy("fedavg");
  CHECK_THROWS_AS(
    aggregate(r.base(), std::span<const SafetensorsFile* const>(), std::vector<double>{}, spec, {}, state), Error);
  CHECK_THROWS_AS(aggregate(r.base(), files, std::vector<double>{1.0, 2.0}, spec, {}, state), Error);
  CHECK_THROWS_AS(aggregate(r.base(), files, std::vector<double>{0.0}, spec, {}, state), Error);
  // An update whose tensors differ from the base's (not validated first) is a verification error.
  std::vector<float> w(6);
  std::vector<float> b(3);
  write_safetensors(
    r.dir() / "bad.safetensors",
    {{{"layer.weight", DType::f32, k_weight_shape, bytes_of(w)}, {"layer.bias", DType::f32, {3}, bytes_of(b)}}},
    {{"fedl.kind", "update"}});
  const SafetensorsFile bad(r.dir() / "bad.safetensors");
  const std::vector<const SafetensorsFile*> with_bad{files[0], &bad};
  CHECK_THROWS_AS(aggregate(r.base(), with_bad, std::vector<double>{1.0, 1.0}, spec, {}, state), VerifyError);
}

TEST_CASE("aggregate: an update file replaced after it was opened is read as it was opened")
{
  // fedl reads big updates with pread() from a descriptor of the mapped file; a file renamed over
  // the path since (another inode) must not be read instead of the one that was validated.
  Round r(k_base);
  const auto path = r.add(constant(1.0F), "1");
  r.add(constant(3.0F), "1");
  write_model(path, constant(100.0F), {{"fedl.kind", "update"}});
  ServerState state;
  const auto files = r.files();
  const auto out =
    flat(detail::aggregate_reading(r.base(), files, std::vector<double>{1, 1}, parse_strategy("fedavg"), {}, state, 0));
  for (std::size_t j = 0; j < 8; ++j) {
    CHECK(out[j] == k_base[j] + 2.0F);
  }
}

TEST_CASE("aggregate: the column sort matches std::sort for every size, including the fallback past the network")
{
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-5, 5);
  for (std::size_t n : {1U, 2U, 3U, 4U, 5U, 7U, 8U, 9U, 15U, 16U, 17U, 31U, 33U, 63U, 64U, 100U, 129U, 4097U}) {
    INFO("n = " << n);
    const std::size_t width = n > 1000 ? 5 : 130; // two full tiles and a partial one
    const std::size_t stride = width + 3;
    std::vector<float> m(n * stride);
    for (auto& x : m) {
      x = static_cast<float>(small(rng)); // many ties
    }
    auto want = m;
    for (std::size_t c = 0; c < width; ++c) {
      std::vector<float> col(n);
      for (std::size_t i = 0; i < n; ++i) {
        col[i] = want[i * stride + c];
      }
      std::sort(col.begin(), col.end());
      for (std::size_t i = 0; i < n; ++i) {
        want[i * stride + c] = col[i];
      }
    }
    detail::sort_columns(m.data(), n, stride, width);
    CHECK(m == want);
  }
  // Exhaustively by the zero-one principle for n ≤ 12: every 0/1 column, one per column.
  for (std::size_t n = 2; n <= 12; ++n) {
    const std::size_t width = std::size_t{1} << n;
    std::vector<double> m(n * width);
    for (std::size_t c = 0; c < width; ++c) {
      for (std::size_t i = 0; i < n; ++i) {
        m[i * width + c] = static_cast<double>((c >> i) & 1U);
      }
    }
    detail::sort_columns(m.data(), n, width, width);
    bool sorted = true;
    for (std::size_t c = 0; c < width; ++c) {
      for (std::size_t i = 1; i < n; ++i) {
        sorted = sorted && m[(i - 1) * width + c] <= m[i * width + c];
      }
    }
    CHECK_MESSAGE(sorted, "n = " << n);
  }
}

TEST_CASE("aggregate: the middle-row selection leaves exactly the sorted middle values in the middle rows")
{
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(-20, 20);
  for (std::size_t n : {1U, 2U, 3U, 4U, 5U, 6U, 9U, 10U, 16U, 17U, 33U, 64U, 101U}) {
    for (std::size_t lo = 0; 2 * lo < n; lo += (n > 20 ? 7 : 1)) {
      for (const bool median : {false, true}) {
        // Trimmed: rows [lo, n − lo); median: the one or two middle rows.
        const std::size_t a = median ? (n - 1) / 2 : lo;
        const std::size_t b = median ? n / 2 + 1 : n - lo;
        INFO("n = " << n << ", rows " << a << ".." << b);
        const std::size_t width = 70;
        const std::size_t stride = 80;
        std::vector<float> m(n * stride);
        for (auto& x : m) {
          x = static_cast<float>(small(rng));
        }
        auto orig = m;
        detail::select_middle(m.data(), n, stride, width, a, b);
        bool ok = true;
        for (std::size_t c = 0; c < width; ++c) {
          std::vector<float> col(n);
          std::vector<float> got;
          for (std::size_t i = 0; i < n; ++i) {
            col[i] = orig[i * stride + c];
          }
          for (std::size_t i = a; i < b; ++i) {
            got.push_back(m[i * stride + c]);
          }
          std::sort(col.begin(), col.end());
          std::sort(got.begin(), got.end());
          ok = ok && std::equal(got.begin(), got.end(), col.begin() + static_cast<std::ptrdiff_t>(a));
        }
        CHECK(ok);
      }
    }
  }
}

TEST_CASE("aggregate: large mixed F32/F64 models on several threads match a direct computation")
{
  // Sizes not multiples of any block or tile, over the thread split; one F64 tensor.
  const std::size_t n32 = 200'003;
  const std::size_t n64 = 70'001;
  const std::size_t updates = 7;
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0F, 1.0F);
  TempDir dir;
  const auto write = [&](const std::filesystem::path& path, const std::vector<float>& a, const std::vector<double>& d,
                         const Metadata& meta) {
    write_safetensors(path,
                      {{{"a", DType::f32, {static_cast<std::int64_t>(n32)}, bytes_of(a)},
                        {"d", DType::f64, {static_cast<std::int64_t>(n64)}, std::as_bytes(std::span(d))}}},
                      meta);
  };
  std::vector<float> base_a(n32);
  std::vector<double> base_d(n64);
  for (auto& x : base_a) {
    x = g(rng);
  }
  for (auto& x : base_d) {
    x = static_cast<double>(g(rng));
  }
  write(dir / "base.safetensors", base_a, base_d, {{"fedl.kind", "model"}});
  const SafetensorsFile base(dir / "base.safetensors");
  std::vector<std::vector<float>> ua(updates, std::vector<float>(n32));
  std::vector<std::vector<double>> ud(updates, std::vector<double>(n64));
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::vector<const SafetensorsFile*> ptrs;
  std::vector<Safetensors> contents;
  std::vector<double> weights;
  for (std::size_t i = 0; i < updates; ++i) {
    for (auto& x : ua[i]) {
      x = g(rng) * 0.1F;
    }
    for (auto& x : ud[i]) {
      x = static_cast<double>(g(rng)) * 0.1;
    }
    const auto path = dir / fmt::format("u{}.safetensors", i);
    write(path, ua[i], ud[i],
          {{"fedl.kind", "update"}, {"fedl.base_sha256", base.sha256()}, {"fedl.num_samples", std::to_string(i + 1)}});
    files.push_back(std::make_unique<SafetensorsFile>(path));
    ptrs.push_back(files.back().get());
    contents.push_back(files.back()->content());
    weights.push_back(static_cast<double>(i + 1));
    CHECK_FALSE(validate_update(base.content(), base.sha256(), files.back()->content()).has_value());
  }
  // value(i, j): coordinate j of update i over the flat space a then d.
  const auto value = [&](std::size_t i, std::size_t j) {
    return j < n32 ? static_cast<double>(ua[i][j]) : ud[i][j - n32];
  };
  const auto base_value = [&](std::size_t j) { return j < n32 ? static_cast<double>(base_a[j]) : base_d[j - n32]; };
  const auto result_value = [&](const std::vector<OwnedTensor>& out, std::size_t j) {
    if (j < n32) {
      float f = 0;
      std::memcpy(&f, out[1].bytes.data() + j * 4, 4); // base order: d (F64) first, then a
      return static_cast<double>(f);
    }
    double d = 0;
    std::memcpy(&d, out[0].bytes.data() + (j - n32) * 8, 8);
    return d;
  };
  ServerOptions o;
  o.threads = 2;
  for (const char* spec : {"fedavg", "median", "trimmed-mean:0.2"}) {
    INFO(spec);
    ServerState state;
    const auto out = aggregate(base, ptrs, weights, parse_strategy(spec), o, state);
    REQUIRE(out.size() == 2);
    CHECK(out[0].name == "d");
    CHECK(out[1].name == "a");
    std::size_t bad = 0;
    std::vector<double> col(updates);
    for (std::size_t j = 0; j < n32 + n64; j += 1) {
      double want = 0;
      if (std::string(spec) == "fedavg") {
        double s = 0;
        double w = 0;
        for (std::size_t i = 0; i < updates; ++i) {
          s += weights[i] * value(i, j);
          w += weights[i];
        }
        want = s / w;
      } else {
        for (std::size_t i = 0; i < updates; ++i) {
          col[i] = value(i, j);
        }
        std::sort(col.begin(), col.end());
        const std::size_t drop = std::string(spec) == "median" ? 3 : 1;
        double s = 0;
        for (std::size_t i = drop; i < updates - drop; ++i) {
          s += col[i];
        }
        want = s / static_cast<double>(updates - 2 * drop);
      }
      want += base_value(j);
      const double tol = j < n32 ? 1e-6 * (1 + std::abs(want)) : 1e-12 * (1 + std::abs(want));
      if (std::abs(result_value(out, j) - want) > tol) {
        ++bad;
      }
    }
    CHECK(bad == 0);
    // The in-memory overload gives the same bytes as the mapped-file one, on one thread too, and
    // so does reading every update with pread().
    ServerOptions one;
    one.threads = 1;
    const auto again = aggregate(base.content(), contents, weights, parse_strategy(spec), one, state);
    CHECK(again[0].bytes == out[0].bytes);
    CHECK(again[1].bytes == out[1].bytes);
    const auto preads = detail::aggregate_reading(base, ptrs, weights, parse_strategy(spec), o, state, 0);
    CHECK(preads[0].bytes == out[0].bytes);
    CHECK(preads[1].bytes == out[1].bytes);
  }
  // Krum on the same data with an outlier appended: the outlier is never chosen.
  ServerState state;
  AggregateInfo info;
  std::vector<const SafetensorsFile*> with_outlier = ptrs;
  std::vector<float> big(n32, 50.0F);
  std::vector<double> bigd(n64, 50.0);
  write(dir / "outlier.safetensors", big, bigd, {{"fedl.kind", "update"}});
  const SafetensorsFile outlier(dir / "outlier.safetensors");
  with_outlier.push_back(&outlier);
  auto w8 = weights;
  w8.push_back(1.0);
  const auto mk = aggregate(base, with_outlier, w8, parse_strategy("multi-krum:1,6"), o, state, &info);
  CHECK(info.selected.size() == 6);
  CHECK(std::find(info.selected.begin(), info.selected.end(), updates) == info.selected.end());
  const auto mk_pread =
    detail::aggregate_reading(base, with_outlier, w8, parse_strategy("multi-krum:1,6"), o, state, 0);
  CHECK(mk_pread[0].bytes == mk[0].bytes);
  CHECK(mk_pread[1].bytes == mk[1].bytes);
  // With clipping, through pread as well.
  ServerOptions clip = o;
  clip.clip_norm = 10.0;
  const auto c1 = aggregate(base, ptrs, weights, parse_strategy("fedavg"), clip, state, &info);
  CHECK(std::count(info.clipped.begin(), info.clipped.end(), true) == static_cast<std::ptrdiff_t>(updates));
  const auto c2 = detail::aggregate_reading(base, ptrs, weights, parse_strategy("fedavg"), clip, state, 0);
  CHECK(c1[0].bytes == c2[0].bytes);
  CHECK(c1[1].bytes == c2[1].bytes);

  // The passes vouch for the values they read: each update read whole, finite, with the Σx² of
  // update_norm to rounding; one NaN or infinity anywhere (here past the threads' cut, and last
  // in the F64 tensor) is seen, in place and through pread() alike, by every strategy.
  const Metadata meta{{"fedl.kind", "update"}, {"fedl.base_sha256", base.sha256()}, {"fedl.num_samples", "1"}};
  ua[2][n32 / 2 + 5] = std::numeric_limits<float>::quiet_NaN();
  write(dir / "nan.safetensors", ua[2], ud[2], meta);
  ud[4][n64 - 1] = -std::numeric_limits<double>::infinity();
  write(dir / "inf.safetensors", ua[4], ud[4], meta);
  const SafetensorsFile nan_file(dir / "nan.safetensors");
  const SafetensorsFile inf_file(dir / "inf.safetensors");
  auto unfit = ptrs;
  unfit[2] = &nan_file;
  unfit[4] = &inf_file;
  for (const char* spec : {"fedavg", "fedadam", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1,3"}) {
    for (const bool clipped : {false, true}) {
      for (const std::size_t budget : {std::size_t{1} << 40, std::size_t{0}}) {
        CAPTURE(spec);
        CAPTURE(clipped);
        CAPTURE(budget);
        ServerState fresh;
        AggregateInfo seen;
        (void)detail::aggregate_reading(base, unfit, weights, parse_strategy(spec), clipped ? clip : o, fresh, budget,
                                        &seen);
        REQUIRE(seen.values.size() == updates);
        for (std::size_t i = 0; i < updates; ++i) {
          CAPTURE(i);
          CHECK(seen.values[i].read_whole);
          CHECK(seen.values[i].finite == (i != 2 && i != 4));
          if (seen.values[i].finite) {
            const double norm = update_norm(unfit[i]->content());
            CHECK(seen.values[i].sum_squares == doctest::Approx(norm * norm).epsilon(1e-12));
          }
        }
      }
    }
  }
}

TEST_SUITE_END();

TEST_CASE("aggregate: client-level DP clips, counts every update once, divides by the sites asked and adds noise")
{
  Round r(k_base);
  r.add(constant(10.0F), "1");
  r.add(constant(10.0F), "1000"); // its sample count must not weigh it more
  ServerOptions o;
  o.clip_norm = 1.0;
  o.threads = 1;
  o.client_dp = ServerOptions::ClientDp{1e-12, 4.0, 7};
  // Each update scaled to norm 1 (10/‖Δ‖ = 1/√8 per coordinate), summed, over the 4 sites asked.
  const double each = 10.0 / std::sqrt(8.0 * 100.0);
  std::vector<double> want;
  for (const float b : k_base) {
    want.push_back(b + 2 * each / 4);
  }
  check_close(r.run("fedavg", {1, 1000}, o), want);

  SUBCASE("the noise has the standard deviation asked for, over the denominator")
  {
    Round zero(k_base);
    zero.add(constant(0.0F));
    zero.add(constant(0.0F));
    o.client_dp = ServerOptions::ClientDp{2.0, 4.0, 0};
    double sum = 0, sq = 0;
    std::size_t n = 0;
    for (int i = 0; i < 1500; ++i) {
      o.client_dp->seed = static_cast<std::uint64_t>(i + 1);
      const auto got = zero.run("fedavg", {1, 1}, o);
      for (std::size_t k = 0; k < got.size(); ++k) {
        const double x = got[k] - k_base[k];
        sum += x;
        sq += x * x;
        ++n;
      }
    }
    const double mean = sum / static_cast<double>(n);
    const double sd = std::sqrt(sq / static_cast<double>(n) - mean * mean);
    // 12000 draws of N(0, 0.5²): the sample sd is within 2% with overwhelming probability.
    CHECK(sd == doctest::Approx(0.5).epsilon(0.02));
    CHECK(std::abs(mean) < 0.02);
    // A fixed seed repeats itself; different seeds differ.
    o.client_dp->seed = 5;
    const auto a = zero.run("fedavg", {1, 1}, o);
    CHECK(zero.run("fedavg", {1, 1}, o) == a);
    o.client_dp->seed = 6;
    CHECK(zero.run("fedavg", {1, 1}, o) != a);
  }

  SUBCASE("robust strategies and a missing clip norm are refused")
  {
    CHECK_THROWS_AS(r.run("median", {1, 1}, o), UsageError);
    o.clip_norm.reset();
    CHECK_THROWS_AS(validate_server_options(o), UsageError);
  }
}
