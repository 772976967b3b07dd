// SPDX-License-Identifier: Apache-2.0
// Secure aggregation's cost without the network (issue 13): N sites and the coordinator of
// core/secagg/protocol in one process, one thread, P words per site. Prints the medians of:
//   key stream      AES-256-CTR alone for the (k + 1) · P · 4 bytes a site expands: the limit
//   site: keys      stage 0 (two X25519 pairs) and stage 1 (Shamir shares, sealed per neighbour)
//   site: mask      stage 2 (its k + 1 masks over P words), and its ratio to the key stream
//   coordinator     summing the N masked inputs (what a plain round also does), then rebuilding the
//                   seeds and the dropped sites' keys and removing their masks, with D% of the
//                   sites dropped after sending their shares (the costliest place to drop)
//
// Usage: fedl_secagg_bench [--n 10] [--params 1000000] [--neighbours K] [--threshold T]
//                          [--dropouts 0,10,30] [--repeat 5]
//   K defaults to default_neighbours(n), T to default_threshold(K).
#include "bench_util.hpp"

#include "core/secagg/protocol.hpp"
#include "core/util/key_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

namespace {

using namespace fedl::core;
using namespace fedl::core::secagg;
using Clock = std::chrono::steady_clock;

constexpr const char* k_usage =
  "usage: fedl_secagg_bench [--n SITES] [--params WORDS] [--neighbours K] [--threshold T]\n"
  "                         [--dropouts PERCENT,...] [--repeat R]\n";

double
since(Clock::time_point t0)
{
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Times
{
  std::vector<double> keys, mask, sum, unmask;
};

// One attempt with `dropped` sites lost after their shares; adds its timings to `t`.
void
attempt(const Params& p, const std::set<std::uint32_t>& dropped, Times& t)
{
  const auto sign = [](std::span<const std::byte>) { return std::string("bench"); };
  const auto verify = [](std::uint32_t, std::span<const std::byte>, std::string_view) { return true; };
  Server server(p);
  std::vector<std::unique_ptr<Client>> clients;
  auto t0 = Clock::now();
  for (std::uint32_t i = 1; i <= p.sites.size(); ++i) {
    clients.push_back(std::make_unique<Client>(p, i, sign));
    (void)server.add_advert(clients.back()->advertise());
  }
  for (auto& c : clients) {
    (void)server.add_shares(c->index(), c->share(server.adverts_for(c->index()), verify));
  }
  t.keys.push_back(since(t0) / static_cast<double>(p.sites.size()));
  std::mt19937 rng(1);
  std::vector<std::uint32_t> input(p.length);
  for (auto& v : input) {
    v = static_cast<std::uint32_t>(rng());
  }
  std::vector<MaskedInput> masked;
  for (auto& c : clients) {
    if (dropped.count(c->index()) != 0) {
      continue;
    }
    t0 = Clock::now();
    auto out = c->mask(input, server.shares_for(c->index()));
    t.mask.push_back(since(t0));
    masked.push_back(std::get<MaskedInput>(std::move(out)));
  }
  t0 = Clock::now();
  for (auto& m : masked) {
    (void)server.add_masked(std::move(m));
  }
  t.sum.push_back(since(t0));
  const auto request = server.unmask_request();
  for (auto& c : clients) {
    if (dropped.count(c->index()) == 0) {
      (void)server.add_signature(c->agree(request));
    }
  }
  for (auto& c : clients) {
    if (dropped.count(c->index()) == 0) {
      (void)server.add_reveal(c->unmask(request, server.signatures(), verify));
    }
  }
  t0 = Clock::now();
  const auto sum = server.unmasked_sum();
  t.unmask.push_back(since(t0));
  // The survivors' inputs were all `input`: check the sum so that nothing is optimized away.
  const auto n = static_cast<std::uint32_t>(p.sites.size() - dropped.size());
  if (sum[0] != input[0] * n) {
    std::fprintf(stderr, "fedl_secagg_bench: the unmasked sum is wrong\n");
    std::exit(1);
  }
}

} // namespace

int
main(int argc, char** argv)
{
  std::size_t n = 10;
  std::size_t words = 1000000;
  std::optional<std::size_t> k;
  std::optional<std::size_t> threshold;
  std::vector<std::size_t> dropouts{0, 10, 30};
  std::size_t repeat = 5;
  fedl::bench::CommandLine cl(argc, argv, "fedl_secagg_bench", k_usage);
  while (cl.next()) {
    const auto& flag = cl.flag();
    if (flag == "--n") {
      n = cl.count();
    } else if (flag == "--params") {
      words = cl.count();
    } else if (flag == "--neighbours") {
      k = cl.count();
    } else if (flag == "--threshold") {
      threshold = cl.count();
    } else if (flag == "--dropouts") {
      dropouts.clear();
      std::stringstream list(cl.value());
      for (std::string item; std::getline(list, item, ',');) {
        const auto d = cl.count_of(item, true);
        if (d >= 100) {
          cl.fail("--dropouts takes percentages below 100");
        }
        dropouts.push_back(d);
      }
    } else if (flag == "--repeat") {
      repeat = cl.count();
    } else {
      cl.fail("unknown option " + flag);
    }
  }
  Params p;
  for (std::size_t i = 0; i < n; ++i) {
    p.sites.push_back("site-" + std::to_string(i + 1));
  }
  p.round = 1;
  p.neighbours = k.value_or(default_neighbours(n));
  p.threshold = threshold.value_or(default_threshold(std::min(p.neighbours, n - 1)));
  p.graph_seed = 7;
  p.length = words;
  try {
    p.check();
  } catch (const fedl::core::Error& e) {
    cl.fail(e.what());
  }
  const std::size_t degree = std::min(p.neighbours, n - 1);

  // The key stream alone, for the bytes one site expands: its seed's mask and one per neighbour.
  std::vector<double> stream_s;
  std::vector<std::byte> buf(std::size_t{1} << 20);
  for (std::size_t r = 0; r < repeat; ++r) {
    const auto t0 = Clock::now();
    for (std::size_t m = 0; m < degree + 1; ++m) {
      KeyStream ks(KeyStream::Key{static_cast<std::byte>(m)});
      for (std::size_t done = 0; done < words * 4; done += buf.size()) {
        ks.fill(std::span(buf).first(std::min(buf.size(), words * 4 - done)));
      }
    }
    stream_s.push_back(since(t0));
  }
  const double stream = fedl::bench::median(stream_s);
  std::printf("secure aggregation, one thread: N = %zu sites, %zu neighbours each, threshold %zu, P = %zu words\n", n,
              degree, p.threshold, words);
  std::printf("  key stream alone, (k + 1) x P x 4 = %.1f MB   %8.1f ms (%.2f GB/s)\n",
              static_cast<double>((degree + 1) * words * 4) / 1e6, stream * 1e3,
              static_cast<double>((degree + 1) * words * 4) / stream / 1e9);
  for (const auto d : dropouts) {
    const auto lost = n * d / 100;
    std::set<std::uint32_t> dropped;
    for (std::size_t i = 0; i < lost; ++i) {
      dropped.insert(static_cast<std::uint32_t>(n - i));
    }
    if (n - lost < std::max(p.threshold + 1, consistency_quorum(p))) {
      std::printf("  %zu%% dropped: too few survivors for threshold %zu; skipped\n", d, p.threshold);
      continue;
    }
    Times t;
    for (std::size_t r = 0; r < repeat; ++r) {
      p.attempt = r + 1;
      attempt(p, dropped, t);
    }
    const double mask = fedl::bench::median(t.mask);
    std::printf("  %2zu%% dropped (%zu of %zu) after their shares:\n", d, lost, n);
    std::printf("    site: keys and shares (stages 0-1)       %8.2f ms\n", fedl::bench::median(t.keys) * 1e3);
    std::printf("    site: masked input (stage 2)             %8.1f ms   %.2fx the key stream\n", mask * 1e3,
                mask / stream);
    std::printf("    coordinator: sum of the masked inputs    %8.1f ms\n", fedl::bench::median(t.sum) * 1e3);
    std::printf("    coordinator: unmasking (stage 3)         %8.1f ms\n", fedl::bench::median(t.unmask) * 1e3);
  }
  return 0;
}
