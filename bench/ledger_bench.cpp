// SPDX-License-Identifier: Apache-2.0
// Planning a round of a long federation (issue 12): a provisioned workspace of one site and a
// four-value model, R rounds committed through core (validate_round, commit_round), and every
// R/5 rounds the median of 5 plans that read the whole ledger (plan_workspace_round without a
// kept state, as `fedl aggregate --workspace` does) against 5 that advance a kept state (as
// `fedl serve` does). Prints both, and the wall time of all the rounds.
//
// Usage: fedl_ledger_bench [--rounds 1000] [--dir DIR]
#include "bench_util.hpp"

#include "core/federation/round.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/file_io.hpp"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

using namespace fedl::core;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* k_usage = "usage: fedl_ledger_bench [--rounds R] [--dir DIR]\n";

double
ms_since(Clock::time_point t0)
{
  return std::chrono::duration<double>(Clock::now() - t0).count() * 1000;
}

} // namespace

int
main(int argc, char** argv)
{
  std::size_t rounds = 1000;
  fs::path dir = fs::temp_directory_path() / "fedl_ledger_bench";
  fedl::bench::CommandLine cl(argc, argv, "fedl_ledger_bench", k_usage);
  while (cl.next()) {
    if (cl.flag() == "--rounds") {
      rounds = cl.count();
    } else if (cl.flag() == "--dir") {
      dir = cl.value();
    } else {
      cl.fail("unknown option " + cl.flag());
    }
  }
  if (rounds < 5) {
    cl.fail("--rounds must be at least 5");
  }
  fs::remove_all(dir);
  const Workspace ws(dir / "ws");
  fs::create_directories(ws.models());
  const std::vector<float> w{1, 2, 3, 4};
  write_safetensors(ws.model(0), {{{"w", DType::f32, {4}, std::as_bytes(std::span(w))}}}, {{"fedl.kind", "model"}});
  FederationConfig config;
  config.model.arch = "mlp";
  config.model.input_shape = {4};
  config.model.classes = 2;
  config.clients = {"site-1"};
  provision_workspace(ws, config, "ledger-bench");
  const auto id = read_identity(ws.client("site-1") / "client.crt", ws.client("site-1") / "client.key");
  const std::vector<float> d{0.1F, 0.1F, 0.1F, 0.1F};
  const std::vector<TensorView> delta{{"w", DType::f32, {4}, std::as_bytes(std::span(d))}};
  std::printf("planning a round of a federation of one site, every %zu of %zu rounds (medians of 5)\n", rounds / 5,
              rounds);
  LedgerState kept;
  const auto t0 = Clock::now();
  for (std::size_t r = 1; r <= rounds; ++r) {
    const auto plan = plan_workspace_round(ws, &kept);
    Metadata meta{{"fedl.kind", "update"}, {"fedl.base_sha256", file_sha256(plan.base)}, {"fedl.num_samples", "10"}};
    sign_update(delta, meta, id);
    write_safetensors(dir / "update.safetensors", delta, meta);
    const std::vector<RoundCandidate> candidates{{dir / "update.safetensors", "site-1"}};
    auto validated = validate_round(plan, candidates, OnBadUpdate::fail);
    (void)commit_round(validated, RoundSettings{});
    if (r % (rounds / 5) == 0) {
      std::vector<double> whole;
      std::vector<double> advanced;
      for (int k = 0; k < 5; ++k) {
        auto t = Clock::now();
        (void)plan_workspace_round(ws);
        whole.push_back(ms_since(t));
        LedgerState copy = kept;
        t = Clock::now();
        (void)plan_workspace_round(ws, &copy);
        advanced.push_back(ms_since(t));
      }
      std::printf("  after %5zu rounds: whole ledger %8.2f ms   kept state %6.2f ms\n", r, fedl::bench::median(whole),
                  fedl::bench::median(advanced));
    }
  }
  std::printf("  %zu rounds committed with the kept state in %.1f s\n", rounds, ms_since(t0) / 1000);
  fs::remove_all(dir);
  return 0;
}
