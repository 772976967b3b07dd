// SPDX-License-Identifier: Apache-2.0
// fedl_fuzz_replay TARGET DIR...: runs every file in each DIR through the fuzz target TARGET's
// LLVMFuzzerTestOneInput, without libFuzzer, in the normal build: the seed corpus and every
// crash that fuzzing found (tests/fuzz/regressions/TARGET) become a test of `make test`. The first
// DIR must hold at least one file; later ones may be missing. A crash names the file.
//
// The inputs run on a thread with a stack of 256 KiB (scripts/fuzz.sh gives the fuzzers the
// same), so that recursion as deep as an input is nested shows with inputs of a few KB: with
// the 8 MiB of fedl's own threads it takes hundreds of KB to overflow, too large for the
// repository.
#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <pthread.h>
#include <signal.h>
#include <string>
#include <string_view>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;

// fedl_fuzz_NAME for each target: its LLVMFuzzerTestOneInput, renamed when it was compiled.
#define FEDL_FUZZ_TARGET(name) extern "C" int fedl_fuzz_##name(const std::uint8_t*, std::size_t);
#include "fuzz_targets.inc"
#undef FEDL_FUZZ_TARGET

namespace {

struct Target
{
  std::string_view name;
  int (*run)(const std::uint8_t*, std::size_t);
};

constexpr Target targets[] = {
#define FEDL_FUZZ_TARGET(name) {#name, fedl_fuzz_##name},
#include "fuzz_targets.inc"
#undef FEDL_FUZZ_TARGET
};

// The input being run, for the crash message (set before each run, read by the handlers).
char g_current[4096] = "";

void
say_current()
{
  const char prefix[] = "fedl_fuzz_replay: crashed on ";
  (void)!::write(2, prefix, sizeof prefix - 1);
  (void)!::write(2, g_current, std::strlen(g_current));
  (void)!::write(2, "\n", 1);
}

void
on_signal(int sig)
{
  say_current();
  std::raise(sig); // SA_RESETHAND: the default action now
}

void
on_terminate()
{
  say_current();
  if (const auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      std::fprintf(stderr, "fedl_fuzz_replay: uncaught exception: %s\n", x.what());
    } catch (...) {
      std::fprintf(stderr, "fedl_fuzz_replay: uncaught exception of an unknown type\n");
    }
  }
  std::abort();
}

struct Run
{
  int argc;
  char** argv;
  const Target* target;
  int status = 0;
};

int run_all(int argc, char** argv, const Target& target);

void*
run_thread(void* arg)
{
  // The crash message needs a stack of its own when the thread's has overflowed.
  static std::vector<char> alt(std::size_t{64} << 10);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  stack_t previous{};
  (void)sigaltstack(&ss, &previous);
  auto* r = static_cast<Run*>(arg);
  r->status = run_all(r->argc, r->argv, *r->target);
  // The previous one back before the thread ends: ASan (make asan) gives each thread an
  // alternate stack of its own and unmaps whatever is installed when the thread exits.
  (void)sigaltstack(&previous, nullptr);
  return nullptr;
}

int
run_all(int argc, char** argv, const Target& target)
{
  for (int i = 2; i < argc; ++i) {
    const fs::path dir = argv[i];
    std::vector<fs::path> files;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.is_regular_file() && entry.path().filename().string().front() != '.') {
        files.push_back(entry.path());
      }
    }
    if (i == 2 && files.empty()) {
      std::fprintf(stderr, "%s: %s holds no inputs\n", argv[0], argv[i]);
      return 1;
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      std::ifstream in(file, std::ios::binary);
      const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::snprintf(g_current, sizeof g_current, "%s", file.c_str());
      target.run(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    }
    std::printf("%s: %zu inputs from %s\n", argv[1], files.size(), argv[i]);
  }
  return 0;
}

} // namespace

int
main(int argc, char** argv)
{
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s TARGET DIR...\n", argv[0]);
    return 2;
  }
  const std::string_view name = argv[1];
  const auto* target =
    std::find_if(std::begin(targets), std::end(targets), [&](const Target& t) { return t.name == name; });
  if (target == std::end(targets)) {
    std::fprintf(stderr, "%s: no fuzz target named %s\n", argv[0], argv[1]);
    return 2;
  }
  std::set_terminate(on_terminate);
  for (const int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    struct sigaction sa
    {};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
    sigaction(sig, &sa, nullptr);
  }
  Run run{argc, argv, target};
  pthread_attr_t attr;
  pthread_t thread;
  if (pthread_attr_init(&attr) != 0 || pthread_attr_setstacksize(&attr, std::size_t{256} << 10) != 0 ||
      pthread_create(&thread, &attr, run_thread, &run) != 0 || pthread_join(thread, nullptr) != 0) {
    std::fprintf(stderr, "%s: cannot start the thread that runs the inputs\n", argv[0]);
    return 1;
  }
  return run.status;
}
