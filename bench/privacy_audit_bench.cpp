// SPDX-License-Identifier: Apache-2.0
// Accounting a long federation's ledger (issue 14): R rounds of client-level DP (q 0.5, sigma 1)
// in which each of S sites also reports a DP-SGD run (its own q = 32 / (1000 + 100·i), sigma 1.1,
// 20 steps): S + 1 distinct (q, sigma) pairs. A forked child records the rounds as fedl serve
// does (FederationPrivacy::record_round, every epsilon after every round) and writes their
// "privacy" objects; this process, its caches cold as a fresh `fedl audit`'s, replays and
// verifies them (replay(..., true) and finish_verify). Prints both times per accountant.
//
// Usage: fedl_privacy_audit_bench [--rounds 1000] [--sites 9] [--accountant pld|rdp|both]
#include "bench_util.hpp"

#include "core/privacy/privacy.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

using namespace fedl::core;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr const char* k_usage =
  "usage: fedl_privacy_audit_bench [--rounds R] [--sites S] [--accountant pld|rdp|both]\n";

double
seconds_since(Clock::time_point t0)
{
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The child: records the rounds, writes one body per line to `path`, prints its time.
void
record(const std::string& path, std::size_t rounds, std::size_t sites, Accountant accountant)
{
  FederationPrivacy coordinator;
  const DpSgdConfig dp{1.1, 1.0, 1e-5};
  std::ofstream out(path);
  const auto t0 = Clock::now();
  for (std::size_t r = 1; r <= rounds; ++r) {
    std::map<std::string, DpSgdReport> reports;
    for (std::size_t i = 0; i < sites; ++i) {
      reports.emplace("site-" + std::to_string(i), dp_sgd_report(dp, 1000 + 100 * i, 32, 20));
    }
    const ClientDpRound client{1.0, 1.0, 0.5, 1e-5, "secret"};
    const json body = {{"round", r}, {"privacy", coordinator.record_round(client, reports, std::nullopt, accountant)}};
    out << body.dump() << '\n';
  }
  std::printf("  record (as fedl serve, every round):  %.3f s\n", seconds_since(t0));
}

void
run(std::size_t rounds, std::size_t sites, Accountant accountant)
{
  std::printf("%s, %zu rounds, %zu sites (%zu distinct (q, sigma) pairs):\n",
              std::string(accountant_name(accountant)).c_str(), rounds, sites, sites + 1);
  std::fflush(stdout);
  const std::string path = "/tmp/fedl_privacy_audit_bench." + std::to_string(getpid()) + ".jsonl";
  const pid_t child = fork();
  if (child == 0) {
    record(path, rounds, sites, accountant);
    std::fflush(stdout);
    _exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "the recording child failed\n");
    std::exit(1);
  }
  std::vector<json> bodies;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    bodies.push_back(json::parse(line));
  }
  std::remove(path.c_str());
  const auto t0 = Clock::now();
  FederationPrivacy audit;
  for (const auto& b : bodies) {
    audit.replay(b, true);
  }
  audit.finish_verify();
  std::printf("  verify (as fedl audit, cold caches):  %.3f s\n", seconds_since(t0));
  std::printf("  final client-level epsilon %.4f at delta 1e-5\n", audit.client().epsilon(1e-5, accountant).epsilon);
}

} // namespace

int
main(int argc, char** argv)
{
  std::size_t rounds = 1000;
  std::size_t sites = 9;
  std::string which = "both";
  fedl::bench::CommandLine cl(argc, argv, "fedl_privacy_audit_bench", k_usage);
  while (cl.next()) {
    if (cl.flag() == "--rounds") {
      rounds = cl.count();
    } else if (cl.flag() == "--sites") {
      sites = cl.count(true);
    } else if (cl.flag() == "--accountant") {
      which = cl.value();
      if (which != "pld" && which != "rdp" && which != "both") {
        cl.fail("--accountant is pld, rdp or both");
      }
    } else {
      cl.fail("unknown option " + cl.flag());
    }
  }
  if (which != "rdp") {
    run(rounds, sites, Accountant::pld_v1);
  }
  if (which != "pld") {
    run(rounds, sites, Accountant::rdp_v2);
  }
  return 0;
}
