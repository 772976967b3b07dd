// SPDX-License-Identifier: Apache-2.0
// fedl_sandbox_bench --runs 30 [--level auto|strict] [--memory-limit SIZE]: what entering the
// trainer sandbox (core/sandbox) costs a trainer at start. Each run forks a child that reports,
// through a pipe, the moment it is ready to work, and is timed from before the fork to that
// report: a plain child (the baseline: fork and a write) and a child that first enters the
// sandbox as fedl's trainer does (namespaces, the mount view, Landlock, seccomp, a pids cgroup,
// and a memory cgroup with --memory-limit), alternately. Prints the medians and their difference,
// the sandbox's set-up cost per trainer start (target: at most 20 ms). The child's cgroups and
// the parent's wait are torn down after the report, off the timed path, as in fedl.
#include "bench_util.hpp"
#include "core/sandbox/sandbox.hpp"
#include "core/util/error.hpp"

#include <chrono>
#include <cstdio>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using Clock = std::chrono::steady_clock;

double
one_start(const fedl::core::SandboxPolicy* policy)
{
  int ready[2] = {-1, -1};
  if (::pipe(ready) != 0) {
    std::perror("pipe");
    std::exit(1);
  }
  const auto t0 = Clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    ::dup2(ready[1], STDOUT_FILENO); // the sandbox keeps descriptors 0 to 2 only
    if (policy != nullptr) {
      (void)fedl::core::enter_sandbox(*policy); // the parent half never returns
    }
    (void)!::write(STDOUT_FILENO, "1", 1);
    ::_exit(0);
  }
  ::close(ready[1]);
  char c = 0;
  const bool ok = ::read(ready[0], &c, 1) == 1;
  const auto t1 = Clock::now();
  ::close(ready[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!ok || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "fedl_sandbox_bench: the child failed (status %#x)\n", static_cast<unsigned>(status));
    std::exit(1);
  }
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

} // namespace

int
main(int argc, char** argv)
{
  using namespace fedl;
  bench::CommandLine cl(argc, argv, "fedl_sandbox_bench",
                        "usage: fedl_sandbox_bench [--runs N] [--level auto|strict] [--memory-limit SIZE]\n");
  std::size_t runs = 30;
  core::SandboxPolicy policy;
  policy.name = "the benchmark's child";
  policy.read = {"/etc/hostname"};
  policy.limits.pids = 64 + 8 * 2;
  try {
    while (cl.next()) {
      if (cl.flag() == "--runs") {
        runs = cl.count();
      } else if (cl.flag() == "--level") {
        policy.level = core::parse_sandbox_level(cl.value(), "--level");
      } else if (cl.flag() == "--memory-limit") {
        policy.limits.memory_bytes = core::parse_memory_size(cl.value(), "--memory-limit");
      } else {
        cl.fail("unknown option " + cl.flag());
      }
    }
  } catch (const core::Error& e) {
    cl.fail(e.what());
  }

  // What the child runs under, once, for the record.
  {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const auto report = core::enter_sandbox(policy);
      std::printf("%s\n", report.summary().c_str());
      std::fflush(stdout);
      ::_exit(0);
    }
    ::waitpid(pid, nullptr, 0);
  }
  one_start(nullptr);
  one_start(&policy); // warm-up: page cache, the first cgroup
  std::vector<double> plain;
  std::vector<double> sandboxed;
  for (std::size_t i = 0; i < runs; ++i) {
    if (i % 2 == 0) {
      plain.push_back(one_start(nullptr));
      sandboxed.push_back(one_start(&policy));
    } else {
      sandboxed.push_back(one_start(&policy));
      plain.push_back(one_start(nullptr));
    }
  }
  const double p = bench::median(plain);
  const double s = bench::median(sandboxed);
  std::printf("runs %zu (alternating), medians:\n", runs);
  std::printf("  fork to ready, plain child      %8.2f ms\n", p);
  std::printf("  fork to ready, sandboxed child  %8.2f ms\n", s);
  std::printf("  sandbox set-up per start        %8.2f ms (target <= 20 ms)\n", s - p);
  return 0;
}
