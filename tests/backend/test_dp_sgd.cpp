// SPDX-License-Identifier: Apache-2.0
// DP-SGD in the torch backend (backends/torch/dp_sgd.hpp): the one-backward per-example clipping
// against the one-example-at-a-time reference, the noise's distribution, Poisson sampling, and
// a private training run through the C table of backend.h.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "backends/backend.h"
#include "backends/torch/dp_sgd.hpp"
#include "backends/torch/zoo.hpp"

#include <doctest/doctest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

extern "C" const fedl_backend_v1* fedl_backend_entry(uint32_t abi_version);

namespace tb = fedl::backends::torch_backend;

namespace {

std::unique_ptr<tb::Model>
zoo(const std::string& spec, const std::vector<int64_t>& shape, int64_t classes, uint64_t seed = 1)
{
  return tb::Model::create(spec, shape, classes, seed, torch::Device("cpu"));
}

// |a - b| / |b| over the whole tensor.
double
relative_error(const torch::Tensor& a, const torch::Tensor& b)
{
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

torch::Tensor
flat_grads(tb::Model& model)
{
  std::vector<torch::Tensor> parts;
  for (const auto& p : model.parameters()) {
    parts.push_back(p.grad().flatten());
  }
  return torch::cat(parts);
}

void
check_matches_reference(const std::string& spec, const std::vector<int64_t>& shape, int64_t classes)
{
  CAPTURE(spec);
  torch::manual_seed(7);
  auto model = zoo(spec, shape, classes);
  model->train_mode(true);
  std::vector<int64_t> xshape{16};
  xshape.insert(xshape.end(), shape.begin(), shape.end());
  const auto x = torch::randn(xshape);
  const auto y = torch::randint(classes, {16}, torch::kInt64);

  // The norms first, with a clip that clips nothing.
  const auto unclipped = tb::dp::clipped_sum_per_example(*model, x, y, 1e30);
  const auto norms = unclipped.norms;
  REQUIRE(norms.size(0) == 16);
  const double lo = norms.min().item<double>();
  const double hi = norms.max().item<double>();
  REQUIRE(lo > 0);
  const double median = norms.median().item<double>();

  for (const double clip : {median * 0.3, hi * 10}) {
    CAPTURE(clip);
    const auto ref = tb::dp::clipped_sum_per_example(*model, x, y, clip);
    const auto fast = tb::dp::clipped_sum_vectorized(*model, x, y, clip);
    REQUIRE(fast.has_value()); // the tape covers every zoo parameter
    const auto clipped = (ref.norms > clip).sum().item<int64_t>();
    if (clip < lo) {
      CHECK(clipped == 16);
    } else if (clip > hi) {
      CHECK(clipped == 0);
    } else {
      CHECK(clipped >= 12);
    }
    CHECK(relative_error(fast->norms, ref.norms) < 1e-5);
    CHECK(std::abs(fast->loss_sum - ref.loss_sum) <= 1e-5 * std::abs(ref.loss_sum));
    REQUIRE(fast->grads.size() == ref.grads.size());
    for (size_t i = 0; i < ref.grads.size(); ++i) {
      CAPTURE(i);
      REQUIRE(fast->grads[i].sizes() == ref.grads[i].sizes());
      CHECK(relative_error(fast->grads[i], ref.grads[i]) < 1e-5);
    }
    // Each clipped example contributes at most C: the sum's norm is at most batch * C.
    double sq = 0;
    for (const auto& g : fast->grads) {
      sq += g.square().sum().item<double>();
    }
    CHECK(std::sqrt(sq) <= 16 * clip * (1 + 1e-5));
  }

  // Without noise, private_gradient sets grad = clipped sum / expected batch.
  tb::dp::GaussianNoise noise(1);
  const double clip = median * 0.3;
  const auto ref = tb::dp::clipped_sum_per_example(*model, x, y, clip);
  const double loss = tb::dp::private_gradient(*model, x, y, tb::dp::Settings{0.0, clip, 20.0}, noise);
  CHECK(std::abs(loss - ref.loss_sum) <= 1e-5 * std::abs(ref.loss_sum));
  const auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    CHECK(relative_error(params[i].grad(), ref.grads[i] / 20.0) < 1e-5);
  }
  // An optimizer's zero_grad() detaches the grads in place, which LibTorch refuses for views.
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
  CHECK_NOTHROW(opt.zero_grad());
}

} // namespace

TEST_SUITE_BEGIN("dp_sgd");

TEST_CASE("per-example clipping in one backward equals the one-example-at-a-time reference")
{
  check_matches_reference("logreg", {20}, 3);
  check_matches_reference("mlp:32,16", {20}, 4);
  check_matches_reference("cnn", {1, 28, 28}, 10);
}

TEST_CASE("the noise is N(0, (sigma C / B)^2) per element, reproducible with a fixed seed")
{
  auto model = zoo("mlp:128", {784}, 10);
  model->train_mode(true);
  const auto x = torch::zeros({0, 784});
  const auto y = torch::zeros({0}, torch::kInt64);
  const tb::dp::Settings settings{1.3, 0.7, 64};
  auto noise_of = [&](uint64_t seed) {
    tb::dp::GaussianNoise noise(seed);
    CHECK(tb::dp::private_gradient(*model, x, y, settings, noise) == 0.0);
    return flat_grads(*model).to(torch::kFloat64);
  };
  const auto z = noise_of(42);
  const auto n = z.numel();
  REQUIRE(n >= 50000);
  const double expected = 1.3 * 0.7 / 64;
  const double sd = z.std().item<double>();
  const double mean = z.mean().item<double>();
  CAPTURE(sd);
  CAPTURE(mean);
  CHECK(std::abs(sd / expected - 1) < 0.02);
  CHECK(std::abs(mean) < 4 * expected / std::sqrt(static_cast<double>(n)));
  // A Gaussian's shape, not only its moments: 68.27% within one sd, 95.45% within two.
  const double within1 = (z.abs() < expected).to(torch::kFloat64).mean().item<double>();
  const double within2 = (z.abs() < 2 * expected).to(torch::kFloat64).mean().item<double>();
  CHECK(std::abs(within1 - 0.6827) < 0.01);
  CHECK(std::abs(within2 - 0.9545) < 0.005);

  // Snapped to the noise's grid before the division by the batch size (core/math/noise.hpp):
  // every noisy sum is a whole multiple of it.
  const double grid = fedl::core::noise_grid(1.3 * 0.7);
  const auto cells = z * 64 / grid;
  CHECK((cells - cells.round()).abs().max().item<double>() < 1e-3);

  CHECK(torch::equal(noise_of(42), z));
  CHECK(!torch::equal(noise_of(43), z));
  // The pieces are drawn on several threads, each from its own child generator: a fixed seed
  // gives the same noise on any number of threads.
  const auto threads = torch::get_num_threads();
  for (const int t : {1, 2, 3}) {
    torch::set_num_threads(t);
    CAPTURE(t);
    CHECK(torch::equal(noise_of(42), z));
  }
  torch::set_num_threads(threads);
  // Seed 0: from the OS, different every time.
  CHECK(!torch::equal(noise_of(0), noise_of(0)));

  // Successive draws from one generator differ.
  tb::dp::GaussianNoise g(5);
  CHECK(!torch::equal(tb::dp::gaussian(g, 1001, 1.0), tb::dp::gaussian(g, 1001, 1.0)));
  CHECK(tb::dp::gaussian(g, 1001, 1.0).numel() == 1001);
}

TEST_CASE("Poisson sampling takes each example with probability q")
{
  auto gen = at::detail::createCPUGenerator(3);
  const int64_t n = 1000;
  const double q = 64.0 / n;
  const int steps = 2000;
  double sum = 0;
  auto hits = torch::zeros({n}, torch::kInt64);
  bool well_formed = true; // int64, in range, ascending (so no example twice)
  for (int i = 0; i < steps; ++i) {
    const auto idx = tb::dp::poisson_sample(n, q, gen);
    sum += static_cast<double>(idx.numel());
    well_formed = well_formed && idx.dtype() == torch::kInt64;
    if (well_formed && idx.numel() > 0) {
      well_formed = idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < n &&
                    idx.slice(0, 1).gt(idx.slice(0, 0, idx.numel() - 1)).all().item<bool>();
      hits.index_add_(0, idx, torch::ones_like(idx));
    }
  }
  CHECK(well_formed);
  const double mean = sum / steps;
  const double se = std::sqrt(n * q * (1 - q) / steps);
  CAPTURE(mean);
  CHECK(std::abs(mean - 64) < 3 * se);
  // Every position equally likely: each of the first, middle and last hundred examples was taken
  // about q * steps times (the sum over 100 of them has sd sqrt(100 steps q (1 - q)) ~ 109).
  const double expect100 = 100 * q * steps;
  const double sd100 = std::sqrt(100 * steps * q * (1 - q));
  for (const int64_t from : {int64_t{0}, n / 2, n - 100}) {
    CAPTURE(from);
    const double got = static_cast<double>(hits.narrow(0, from, 100).sum().item<int64_t>());
    CHECK(std::abs(got - expect100) < 4 * sd100);
  }
  // q = 1 takes everything; q = 0 nothing.
  CHECK(tb::dp::poisson_sample(10, 1.0, gen).numel() == 10);
  CHECK(tb::dp::poisson_sample(10, 0.0, gen).numel() == 0);
  // Reproducible from the seed.
  auto g1 = at::detail::createCPUGenerator(9);
  auto g2 = at::detail::createCPUGenerator(9);
  CHECK(torch::equal(tb::dp::poisson_sample(n, q, g1), tb::dp::poisson_sample(n, q, g2)));
}

namespace {

struct Blobs
{
  std::vector<float> x;
  std::vector<int64_t> y;
  std::vector<int64_t> shape{2};
  fedl_dataset data() const { return fedl_dataset{x.data(), y.data(), y.size(), 1, shape.data()}; }
};

// Two separable Gaussian blobs around (-2, -2) and (2, 2).
Blobs
blobs(int64_t n)
{
  torch::manual_seed(11);
  const auto y = torch::randint(2, {n}, torch::kInt64);
  const auto x = torch::randn({n, 2}) * 0.7 + (y.to(torch::kFloat32) * 4 - 2).unsqueeze(1);
  Blobs b;
  b.x.assign(x.data_ptr<float>(), x.data_ptr<float>() + x.numel());
  b.y.assign(y.data_ptr<int64_t>(), y.data_ptr<int64_t>() + n);
  return b;
}

fedl_train_config
dp_config(uint32_t batch, double sigma, double clip)
{
  fedl_train_config c{};
  c.epochs = 5;
  c.batch_size = batch;
  c.lr = 0.5;
  c.optimizer = FEDL_OPT_SGD;
  c.seed = 3;
  c.dp_noise_multiplier = sigma;
  c.dp_max_grad_norm = clip;
  c.dp_noise_seed = 7;
  return c;
}

} // namespace

TEST_CASE("the C table: bad DP settings are FEDL_STATUS_USAGE")
{
  const auto* api = fedl_backend_entry(FEDL_BACKEND_ABI_VERSION);
  REQUIRE(api != nullptr);
  CHECK(api->abi_version == 4u);
  CHECK((api->torchscript_inspect != nullptr));
  CHECK((api->model_predict != nullptr));
  CHECK(fedl_backend_entry(1) == nullptr);
  const auto b = blobs(100);
  const auto data = b.data();
  fedl_model* m = nullptr;
  const int64_t shape[] = {2};
  REQUIRE(api->model_create("logreg", 1, shape, 2, 1, "cpu", &m) == FEDL_STATUS_OK);
  fedl_train_result r{};
  struct Bad
  {
    fedl_train_config cfg;
    const char* says;
  };
  const Bad bad[] = {
    {dp_config(101, 1.0, 1.0), "cannot exceed the number of training examples (100)"},
    {dp_config(0, 1.0, 1.0), "batch size of at least 1"},
    {dp_config(10, 1.0, 0.0), "needs a clipping norm"},
    {dp_config(10, 1.0, -1.0), "dp_max_grad_norm"},
    {dp_config(10, -1.0, 1.0), "dp_noise_multiplier"},
    {dp_config(10, std::nan(""), 1.0), "dp_noise_multiplier"},
    {dp_config(10, 1.0, INFINITY), "dp_max_grad_norm"},
  };
  for (const auto& c : bad) {
    CAPTURE(c.says);
    CHECK(api->model_train(m, &data, &c.cfg, nullptr, nullptr, &r) == FEDL_STATUS_USAGE);
    CHECK(std::string(api->last_error()).find(c.says) != std::string::npos);
  }
  // batch_size == count is allowed (q = 1).
  auto ok = dp_config(100, 1.0, 1.0);
  ok.epochs = 1;
  CHECK(api->model_train(m, &data, &ok, nullptr, nullptr, &r) == FEDL_STATUS_OK);
  CHECK(r.steps == 1);
  // model_predict (ABI 4): class probabilities, in pieces, that agree with model_evaluate.
  std::vector<float> p(100 * 2, -1.0F);
  REQUIRE(api->model_predict(m, &data, 0, 60, 2, p.data()) == FEDL_STATUS_OK);
  REQUIRE(api->model_predict(m, &data, 60, 40, 2, p.data() + 120) == FEDL_STATUS_OK);
  fedl_eval_result e{};
  REQUIRE(api->model_evaluate(m, &data, 64, &e) == FEDL_STATUS_OK);
  std::size_t correct = 0;
  for (std::size_t i = 0; i < 100; ++i) {
    CHECK(p[2 * i] + p[2 * i + 1] == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(p[2 * i] >= 0.0F);
    correct += (p[2 * i + 1] > p[2 * i] ? 1 : 0) == b.y[i] ? 1 : 0;
  }
  CHECK(static_cast<double>(correct) / 100 == doctest::Approx(e.accuracy));
  CHECK(api->model_predict(m, &data, 0, 10, 3, p.data()) == FEDL_STATUS_DATA); // another width
  CHECK(std::string(api->last_error()).find("class scores") != std::string::npos);
  CHECK(api->model_predict(m, &data, 90, 20, 2, p.data()) == FEDL_STATUS_USAGE); // past the data
  api->model_free(m);
}

TEST_CASE("a private training run through b_model_train still learns a separable problem")
{
  const auto* api = fedl_backend_entry(FEDL_BACKEND_ABI_VERSION);
  REQUIRE(api != nullptr);
  const auto b = blobs(400);
  const auto data = b.data();
  const int64_t shape[] = {2};
  for (const char* spec : {"logreg", "mlp:16"}) {
    for (const double prox : {0.0, 0.1}) {
      CAPTURE(spec);
      CAPTURE(prox);
      fedl_model* m = nullptr;
      REQUIRE(api->model_create(spec, 1, shape, 2, 1, "cpu", &m) == FEDL_STATUS_OK);
      fedl_eval_result before{};
      REQUIRE(api->model_evaluate(m, &data, 64, &before) == FEDL_STATUS_OK);
      auto cfg = dp_config(32, 1.0, 1.0);
      cfg.prox_mu = prox;
      std::vector<double> epoch_losses;
      auto progress = [](void* user, uint32_t, uint64_t, uint64_t, double loss, int done) {
        if (done != 0) {
          static_cast<std::vector<double>*>(user)->push_back(loss);
        }
        return 0;
      };
      fedl_train_result r{};
      REQUIRE(api->model_train(m, &data, &cfg, +progress, &epoch_losses, &r) == FEDL_STATUS_OK);
      fedl_eval_result after{};
      REQUIRE(api->model_evaluate(m, &data, 64, &after) == FEDL_STATUS_OK);
      CHECK(r.samples == 400);
      CHECK(r.steps == 5 * 13);
      CHECK(std::isfinite(r.loss));
      REQUIRE(epoch_losses.size() == 5);
      CHECK(epoch_losses.back() == r.loss);
      CHECK(epoch_losses.back() < epoch_losses.front());
      CHECK(after.loss < 0.5 * before.loss);
      CHECK(after.accuracy > 0.95);
      // Ordinary training on the same model afterwards: its optimizer's zero_grad() must accept
      // the gradients DP-SGD left.
      auto plain = dp_config(32, 0.0, 0.0);
      plain.epochs = 1;
      CHECK(api->model_train(m, &data, &plain, nullptr, nullptr, &r) == FEDL_STATUS_OK);
      api->model_free(m);
    }
  }
}

TEST_CASE("a TorchScript model trains privately through the one-example-at-a-time fallback")
{
  // tests/e2e/export_torchscript.py: Linear(64, 48), Tanh, Linear(48, 10), scripted by Python.
  const auto pt =
    (std::filesystem::temp_directory_path() / ("fedl_test_dp_sgd_" + std::to_string(::getpid()) + ".pt")).string();
  const std::string cmd = "/usr/bin/python3 " FEDL_SOURCE_DIR "/tests/e2e/export_torchscript.py " + pt + " 2>/dev/null";
  if (std::system(cmd.c_str()) != 0) {
    MESSAGE("skipped: /usr/bin/python3 with torch cannot script the model");
    return;
  }
  auto script = tb::Model::load_torchscript(pt, torch::Device("cpu"));
  const auto* api = fedl_backend_entry(FEDL_BACKEND_ABI_VERSION);
  REQUIRE(api != nullptr);
  fedl_model* m = nullptr;
  REQUIRE(api->model_load_torchscript(pt.c_str(), "cpu", &m) == FEDL_STATUS_OK);
  std::filesystem::remove(pt);

  // Labels 0 and 1 (of the model's 10) by the side of a hyperplane: learnable by the script's model.
  torch::manual_seed(5);
  const int64_t n = 512;
  const auto x = torch::randn({n, 64}) * 4;
  const auto y = x.mm(torch::randn({64, 1})).flatten().gt(0).to(torch::kInt64);

  // No tape: clipped_sum is the per-example computation.
  script->train_mode(true);
  const auto xb = x.narrow(0, 0, 16);
  const auto yb = y.narrow(0, 0, 16);
  CHECK_FALSE(tb::dp::clipped_sum_vectorized(*script, xb, yb, 0.5).has_value());
  const auto a = tb::dp::clipped_sum(*script, xb, yb, 0.5);
  const auto b = tb::dp::clipped_sum_per_example(*script, xb, yb, 0.5);
  REQUIRE(a.grads.size() == 4);
  for (size_t i = 0; i < a.grads.size(); ++i) {
    CHECK(relative_error(a.grads[i], b.grads[i]) < 1e-6);
  }

  std::vector<float> features(x.data_ptr<float>(), x.data_ptr<float>() + x.numel());
  std::vector<int64_t> labels(y.data_ptr<int64_t>(), y.data_ptr<int64_t>() + n);
  const int64_t shape[] = {64};
  const fedl_dataset data{features.data(), labels.data(), static_cast<uint64_t>(n), 1, shape};
  fedl_eval_result before{};
  REQUIRE(api->model_evaluate(m, &data, 128, &before) == FEDL_STATUS_OK);
  auto cfg = dp_config(64, 0.5, 1.0);
  cfg.epochs = 4;
  cfg.lr = 1.0;
  fedl_train_result r{};
  REQUIRE(api->model_train(m, &data, &cfg, nullptr, nullptr, &r) == FEDL_STATUS_OK);
  fedl_eval_result after{};
  REQUIRE(api->model_evaluate(m, &data, 128, &after) == FEDL_STATUS_OK);
  CHECK(r.steps == 4 * 8);
  CAPTURE(before.loss);
  CAPTURE(after.loss);
  CHECK(after.loss < 0.5 * before.loss);
  CHECK(after.accuracy > 0.8);
  api->model_free(m);
}

TEST_SUITE_END();
