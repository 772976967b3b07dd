// SPDX-License-Identifier: Apache-2.0
// fedl_dp_sgd_bench: what DP-SGD (per-example clipping and Gaussian noise) costs against ordinary
// training, through the torch backend's C table exactly as fedl train calls it (loaded by
// backends/loader). Each run trains a fresh model for one epoch, non-private and private
// alternately (the order flips every run), and prints the median seconds of each and their ratio.
//
// Usage: fedl_dp_sgd_bench [--models "mlp:128;cnn"] [--limit 10000] [--runs 5] [--threads 2]
//                          [--batch 64] [--sigma 1.0] [--clip 1.0] [--images PATH]
// The labels are found beside the images (train-labels-idx1-ubyte.gz). FEDL_BACKEND_PATH
// overrides where the backend is loaded from (default: this build's src/ folder).
#include "backends/loader.hpp"
#include "bench_util.hpp"
#include "core/format/dataset.hpp"
#include "core/util/error.hpp"

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#ifndef FEDL_BENCH_BACKEND_DIR
#define FEDL_BENCH_BACKEND_DIR ""
#endif

namespace {

struct Args
{
  std::vector<std::string> models{"mlp:128", "cnn"};
  std::size_t limit = 10000;
  std::size_t runs = 5;
  std::size_t threads = 2;
  std::size_t batch = 64;
  double sigma = 1.0;
  double clip = 1.0;
  std::string images = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";
};

Args
parse_args(int argc, char** argv)
{
  fedl::bench::CommandLine cl(
    argc, argv, "fedl_dp_sgd_bench",
    "usage: fedl_dp_sgd_bench [--models \"mlp:128;cnn\"] [--limit N] [--runs R] [--threads T]\n"
    "                         [--batch B] [--sigma S] [--clip C] [--images PATH]\n");
  Args a;
  while (cl.next()) {
    const auto& flag = cl.flag();
    if (flag == "--models") {
      a.models.clear();
      std::stringstream ss(cl.value());
      std::string item;
      while (std::getline(ss, item, ';')) {
        a.models.push_back(item);
      }
    } else if (flag == "--limit") {
      a.limit = cl.count();
    } else if (flag == "--runs") {
      a.runs = cl.count();
    } else if (flag == "--threads") {
      a.threads = cl.count();
    } else if (flag == "--batch") {
      a.batch = cl.count();
    } else if (flag == "--sigma") {
      a.sigma = cl.positive();
    } else if (flag == "--clip") {
      a.clip = cl.positive();
    } else if (flag == "--images") {
      a.images = cl.value();
    } else {
      cl.fail("unknown argument " + flag);
    }
  }
  return a;
}

struct Timed
{
  double seconds = 0;
  double loss = 0;
};

Timed
train_once(const fedl::backends::Backend& backend, const std::string& device, const std::string& spec,
           const fedl::core::Dataset& data, const fedl_train_config& cfg)
{
  auto model = fedl::backends::Model::create(backend, device, spec, data.sample_shape, 10, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = model.train(data, cfg, {});
  const auto t1 = std::chrono::steady_clock::now();
  return {std::chrono::duration<double>(t1 - t0).count(), r.loss};
}

} // namespace

int
main(int argc, char** argv)
{
  const Args args = parse_args(argc, argv);
  if (std::getenv("FEDL_BACKEND_PATH") == nullptr && std::string(FEDL_BENCH_BACKEND_DIR).size() > 0) {
    ::setenv("FEDL_BACKEND_PATH", FEDL_BENCH_BACKEND_DIR, 1);
  }
  try {
    fedl::core::DataOptions opts;
    opts.path = args.images;
    opts.limit = args.limit;
    const auto data = fedl::core::load_dataset(opts);
    const auto [backend, device] = fedl::backends::resolve_device("cpu");
    backend->api->set_threads(static_cast<int32_t>(args.threads));

    fedl_train_config plain{};
    plain.epochs = 1;
    plain.batch_size = static_cast<uint32_t>(args.batch);
    plain.lr = 0.05;
    plain.optimizer = FEDL_OPT_SGD;
    plain.momentum = 0.9;
    plain.seed = 0;
    fedl_train_config priv = plain;
    priv.dp_noise_multiplier = args.sigma;
    priv.dp_max_grad_norm = args.clip;
    priv.dp_noise_seed = 0; // from the OS, as in real use

    fmt::print("DP-SGD vs ordinary training: {} ({}), {} images of {}, 1 epoch, batch {}, SGD lr 0.05 "
               "momentum 0.9, sigma {} clip {}, {} threads, {} runs (alternating)\n",
               backend->api->runtime, device, data.size(), args.images, args.batch, args.sigma, args.clip, args.threads,
               args.runs);
    for (const auto& spec : args.models) {
      // One untimed run of each first: page faults, allocator and thread pool warm-up.
      (void)train_once(*backend, device, spec, data, plain);
      (void)train_once(*backend, device, spec, data, priv);
      std::vector<double> t_plain;
      std::vector<double> t_priv;
      std::vector<double> l_plain;
      std::vector<double> l_priv;
      for (std::size_t r = 0; r < args.runs; ++r) {
        for (int k = 0; k < 2; ++k) {
          const bool dp = (k == 0) == (r % 2 == 1);
          const auto t = train_once(*backend, device, spec, data, dp ? priv : plain);
          (dp ? t_priv : t_plain).push_back(t.seconds);
          (dp ? l_priv : l_plain).push_back(t.loss);
        }
      }
      const double mp = fedl::bench::median(t_plain);
      const double md = fedl::bench::median(t_priv);
      fmt::print("{:<10} non-private {:7.3f} s (loss {:.3f})   DP-SGD {:7.3f} s (loss {:.3f})   ratio {:.2f}x\n", spec,
                 mp, fedl::bench::median(l_plain), md, fedl::bench::median(l_priv), md / mp);
    }
  } catch (const fedl::core::Error& e) {
    std::fprintf(stderr, "fedl_dp_sgd_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
