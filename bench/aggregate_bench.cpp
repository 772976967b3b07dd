// SPDX-License-Identifier: Apache-2.0
// fedl_aggregate_bench: how fast fedl's aggregation strategies run against what the machine can
// do, measured in the same run (DESIGN §8): a plain read-sum over the same mapped update files
// (the memory read bandwidth the page cache delivers; also the same read-sum through pread() into
// a huge-page buffer, the other route out of the page cache) and NumPy's weighted average of the same
// files (bench/aggregate_numpy.py, the way a Python framework loads and sums updates). Also the
// peak RSS of a fedavg run in a fresh child process, against 3 × model size + 50 MB.
//
// Usage: fedl_aggregate_bench [--n 16] [--params 4000000] [--repeat 5] [--dir DIR] [--tensors 4]
//                             [--rss-n 16,64] [--pread-kb 256,2048] [--numpy PATH | --no-numpy] [--keep]
// Files are written with write_safetensors into DIR (default: a new folder under $TMPDIR), read
// once so that they are in the page cache, and removed at the end unless --keep.
#include "bench_util.hpp"
#include "core/format/safetensors.hpp"
#include "core/math/aggregate.hpp"
#include "core/util/error.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef FEDL_BENCH_SOURCE_DIR
#define FEDL_BENCH_SOURCE_DIR "bench"
#endif

namespace fs = std::filesystem;
using namespace fedl::core;

namespace {

struct Args
{
  std::size_t n = 16;
  std::size_t params = 4'000'000;
  std::size_t repeat = 5;
  std::size_t tensors = 4;
  std::string dir;
  std::vector<std::size_t> rss_n{16, 64};
  std::vector<std::size_t> pread_kb{256, 2048};
  std::string numpy = std::string(FEDL_BENCH_SOURCE_DIR) + "/aggregate_numpy.py";
  bool keep = false;
};

Args
parse_args(int argc, char** argv)
{
  fedl::bench::CommandLine cl(
    argc, argv, "fedl_aggregate_bench",
    "usage: fedl_aggregate_bench [--n N] [--params P] [--repeat R] [--dir DIR] [--tensors K]\n"
    "                            [--rss-n N1,N2|none] [--pread-kb K1,K2] [--numpy PATH | --no-numpy]\n"
    "                            [--keep]\n");
  Args a;
  while (cl.next()) {
    const auto& flag = cl.flag();
    if (flag == "--n") {
      a.n = cl.count();
    } else if (flag == "--params") {
      a.params = cl.count();
    } else if (flag == "--repeat") {
      a.repeat = cl.count();
    } else if (flag == "--tensors") {
      a.tensors = cl.count();
    } else if (flag == "--dir") {
      a.dir = cl.value();
    } else if (flag == "--rss-n") {
      const auto text = cl.value();
      a.rss_n = text == "none" ? std::vector<std::size_t>{} : cl.counts_of(text);
    } else if (flag == "--pread-kb") {
      a.pread_kb = cl.counts_of(cl.value());
    } else if (flag == "--numpy") {
      a.numpy = cl.value();
    } else if (flag == "--no-numpy") {
      a.numpy.clear();
    } else if (flag == "--keep") {
      a.keep = true;
    } else {
      cl.fail("unknown argument " + flag);
    }
  }
  a.tensors = std::min(a.tensors, a.params);
  return a;
}

double
seconds_since(std::chrono::steady_clock::time_point t0)
{
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

using fedl::bench::median;

std::string
cpu_model()
{
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        return line.substr(colon + 2);
      }
    }
  }
  return "unknown CPU";
}

fs::path
update_path(const fs::path& dir, std::size_t i)
{
  return dir / fmt::format("update-{:03}.safetensors", i);
}

std::uint64_t
num_samples(std::size_t i)
{
  return 100 + (37 * i) % 900;
}

// P values in K tensors "layers.k.weight" (the last one takes the remainder).
std::vector<std::size_t>
tensor_sizes(const Args& a)
{
  std::vector<std::size_t> sizes(a.tensors, a.params / a.tensors);
  sizes.back() += a.params % a.tensors;
  return sizes;
}

void
write_file(const fs::path& path, const std::vector<std::size_t>& sizes, std::uint64_t seed, float scale,
           const Metadata& meta)
{
  std::vector<std::vector<float>> data;
  std::vector<std::string> names;
  std::vector<TensorView> views;
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    std::vector<float> v(sizes[k]);
    for (auto& f : v) {
      x ^= x >> 12;
      x ^= x << 25;
      x ^= x >> 27;
      const auto u = static_cast<float>((x * 0x2545F4914F6CDD1DULL) >> 40) * (1.0F / 16777216.0F);
      f = (u - 0.5F) * scale;
    }
    data.push_back(std::move(v));
    names.push_back(fmt::format("layers.{}.weight", k));
  }
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    views.push_back({names[k], DType::f32, {static_cast<std::int64_t>(sizes[k])}, std::as_bytes(std::span(data[k]))});
  }
  write_safetensors(path, views, meta);
}

// Opens base and updates 0..n-1 (fresh mappings).
struct Opened
{
  std::unique_ptr<SafetensorsFile> base;
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::vector<const SafetensorsFile*> ptrs;
  std::vector<double> weights;
};

Opened
open_files(const fs::path& dir, std::size_t n)
{
  Opened o;
  o.base = std::make_unique<SafetensorsFile>(dir / "base.safetensors");
  for (std::size_t i = 0; i < n; ++i) {
    o.files.push_back(std::make_unique<SafetensorsFile>(update_path(dir, i)));
    o.ptrs.push_back(o.files.back().get());
    o.weights.push_back(static_cast<double>(num_samples(i)));
  }
  return o;
}

// The read-sum baseline: every thread sums its half (third, ...) of every tensor of every file,
// file after file, with 16 float accumulators (vectorized): the rate at which the mapped data can
// be read at all.
float
read_sum(const std::vector<const SafetensorsFile*>& files, unsigned threads)
{
  std::vector<float> sums(threads, 0.0F);
  auto work = [&](unsigned t) {
    std::array<float, 16> acc{};
    for (const auto* f : files) {
      for (const auto& tensor : f->content().tensors) {
        const std::size_t n = tensor.numel();
        const std::size_t b = n * t / threads;
        const std::size_t e = n * (t + 1) / threads;
        const std::byte* p = tensor.data.data();
        std::size_t j = b;
        for (; j + 16 <= e; j += 16) {
          for (std::size_t k = 0; k < 16; ++k) {
            float v;
            std::memcpy(&v, p + (j + k) * 4, 4);
            acc[k] += v;
          }
        }
        for (; j < e; ++j) {
          float v;
          std::memcpy(&v, p + j * 4, 4);
          acc[0] += v;
        }
      }
    }
    float s = 0;
    for (const auto v : acc) {
      s += v;
    }
    sums[t] = s;
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) {
    pool.emplace_back(work, t);
  }
  work(0);
  for (auto& th : pool) {
    th.join();
  }
  float s = 0;
  for (const auto v : sums) {
    s += v;
  }
  return s;
}

// The same read-sum through the other route from the page cache: each thread pread()s its part of
// every tensor of every file, in chunks of `chunk` bytes, into its own 2 MiB-aligned buffer
// (madvise MADV_HUGEPAGE) and sums it there. The kernel copies through its direct map, so this is
// not bound by the TLB misses of a user mapping of 4 KB pages; the buffer stays cache-resident.
float
read_sum_pread(const std::vector<const SafetensorsFile*>& files, unsigned threads, std::size_t chunk)
{
  std::vector<int> fds;
  for (const auto* f : files) {
    const int fd = ::open(f->path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      throw Error("cannot open {}", f->path().string());
    }
    fds.push_back(fd);
  }
  std::vector<float> sums(threads, 0.0F);
  auto work = [&](unsigned t) {
    constexpr std::size_t huge = std::size_t{2} << 20;
    const std::size_t cap = (chunk + huge - 1) / huge * huge;
    void* mem = std::aligned_alloc(huge, cap);
    if (mem == nullptr) {
      return;
    }
    ::madvise(mem, cap, MADV_HUGEPAGE);
    auto* buf = static_cast<std::byte*>(mem);
    std::array<float, 16> acc{};
    for (std::size_t fi = 0; fi < files.size(); ++fi) {
      const std::byte* origin = files[fi]->bytes().data();
      for (const auto& tensor : files[fi]->content().tensors) {
        const std::size_t n = tensor.numel();
        const std::size_t b = n * t / threads;
        const std::size_t e = n * (t + 1) / threads;
        auto offset = static_cast<off_t>(tensor.data.data() - origin) + static_cast<off_t>(b * 4);
        std::size_t left = (e - b) * 4;
        while (left > 0) {
          const std::size_t want = std::min(left, chunk / 64 * 64);
          const auto got = ::pread(fds[fi], buf, want, offset);
          if (got <= 0) {
            left = 0;
            break;
          }
          const std::size_t m = static_cast<std::size_t>(got) / 4;
          std::size_t j = 0;
          for (; j + 16 <= m; j += 16) {
            for (std::size_t k = 0; k < 16; ++k) {
              float v;
              std::memcpy(&v, buf + (j + k) * 4, 4);
              acc[k] += v;
            }
          }
          for (; j < m; ++j) {
            float v;
            std::memcpy(&v, buf + j * 4, 4);
            acc[0] += v;
          }
          offset += got;
          left -= static_cast<std::size_t>(got);
        }
      }
    }
    std::free(mem);
    float s = 0;
    for (const auto v : acc) {
      s += v;
    }
    sums[t] = s;
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) {
    pool.emplace_back(work, t);
  }
  work(0);
  for (auto& th : pool) {
    th.join();
  }
  for (const int fd : fds) {
    ::close(fd);
  }
  float s = 0;
  for (const auto v : sums) {
    s += v;
  }
  return s;
}

long
max_rss_kb()
{
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

long
current_rss_kb()
{
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::stol(line.substr(6));
    }
  }
  return 0;
}

// The child of the RSS measurement: a fresh process (exec'd, so it inherits none of the parent's
// memory) that opens the files, runs fedavg once and prints "RSS_BEFORE RSS_PEAK" in KiB.
int
rss_child(const fs::path& dir, std::size_t n)
{
  auto o = open_files(dir, n);
  const long before = current_rss_kb();
  ServerState state;
  const auto out = aggregate(*o.base, o.ptrs, o.weights, parse_strategy("fedavg"), {}, state);
  std::printf("%ld %ld %zu\n", before, max_rss_kb(), out.size());
  return 0;
}

struct RssResult
{
  long before_kb = 0;
  long peak_kb = 0;
};

std::optional<RssResult>
measure_rss(const fs::path& dir, std::size_t n)
{
  int fds[2];
  if (::pipe(fds) != 0) {
    return std::nullopt;
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    return std::nullopt;
  }
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    const auto nn = std::to_string(n);
    const auto d = dir.string();
    ::execl("/proc/self/exe", "fedl_aggregate_bench", "--rss-child", d.c_str(), nn.c_str(),
            static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  ::close(fds[1]);
  std::string text;
  char buf[256];
  ssize_t got = 0;
  while ((got = ::read(fds[0], buf, sizeof buf)) > 0) {
    text.append(buf, static_cast<std::size_t>(got));
  }
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  RssResult r;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
      std::sscanf(text.c_str(), "%ld %ld", &r.before_kb, &r.peak_kb) != 2) {
    return std::nullopt;
  }
  return r;
}

// Runs the NumPy baseline; returns its median seconds per aggregation, or nullopt.
std::optional<double>
run_numpy(const std::string& script, const fs::path& dir, std::size_t n, std::size_t repeat, std::string& note)
{
  const auto cmd =
    fmt::format("/usr/bin/python3 '{}' --dir '{}' --n {} --repeat {} 2>&1", script, dir.string(), n, repeat);
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    note = "could not start /usr/bin/python3";
    return std::nullopt;
  }
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p) != nullptr) {
    out += buf;
  }
  const int rc = ::pclose(p);
  const auto pos = out.find("median_s=");
  if (rc != 0 || pos == std::string::npos) {
    note = out.empty() ? "no output" : out.substr(0, 300);
    return std::nullopt;
  }
  return std::stod(out.substr(pos + 9));
}

} // namespace

int
main(int argc, char** argv)
try {
  if (argc == 4 && std::string(argv[1]) == "--rss-child") {
    return rss_child(argv[2], std::stoull(argv[3]));
  }
  const Args args = parse_args(argc, argv);
  std::size_t files_needed = args.n;
  for (const auto n : args.rss_n) {
    files_needed = std::max(files_needed, n);
  }
  fs::path dir = args.dir;
  bool made_dir = false;
  if (dir.empty()) {
    std::string tmpl = (fs::temp_directory_path() / "fedl-aggbench-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      throw Error("cannot create a folder under {}", fs::temp_directory_path().string());
    }
    dir = tmpl;
    made_dir = true;
  } else {
    made_dir = !fs::exists(dir);
    fs::create_directories(dir);
  }
  const auto sizes = tensor_sizes(args);
  const unsigned threads = std::max(1U, std::thread::hardware_concurrency());
  const double update_bytes = static_cast<double>(args.n) * static_cast<double>(args.params) * 4.0;
  const double model_mb = static_cast<double>(args.params) * 4.0 / 1e6;

  std::fprintf(stderr, "writing base + %zu updates of %zu F32 params to %s ...\n", files_needed, args.params,
               dir.string().c_str());
  write_file(dir / "base.safetensors", sizes, 999'999, 2.0F, {{"fedl.kind", "model"}});
  const auto base_sha = SafetensorsFile(dir / "base.safetensors").sha256();
  for (std::size_t i = 0; i < files_needed; ++i) {
    write_file(
      update_path(dir, i), sizes, i + 1, 0.02F,
      {{"fedl.kind", "update"}, {"fedl.base_sha256", base_sha}, {"fedl.num_samples", std::to_string(num_samples(i))}});
  }
  // Read every file once, so that all of them are in the page cache.
  {
    auto o = open_files(dir, files_needed);
    volatile float sink = read_sum(o.ptrs, threads);
    (void)sink;
  }

  const auto time_runs = [&](auto&& fn) {
    std::vector<double> t;
    for (std::size_t r = 0; r < args.repeat; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      t.push_back(seconds_since(t0));
    }
    return median(t);
  };
  volatile float sink = 0;
  // (1) read-sum over fresh mappings (the page faults included, as aggregate pays them) and over
  // mappings already populated (pure memory bandwidth).
  const double t_read = time_runs([&] {
    auto o = open_files(dir, args.n);
    sink = sink + read_sum(o.ptrs, threads);
  });
  double t_read_warm = 0;
  {
    auto o = open_files(dir, args.n);
    sink = sink + read_sum(o.ptrs, threads);
    t_read_warm = time_runs([&] { sink = sink + read_sum(o.ptrs, threads); });
  }
  // (1b) the read-sum through pread() into a huge-page buffer, for several chunk sizes.
  std::vector<std::pair<std::size_t, double>> t_pread;
  for (const std::size_t kb : args.pread_kb) {
    t_pread.emplace_back(kb, time_runs([&] {
                           auto o = open_files(dir, args.n);
                           sink = sink + read_sum_pread(o.ptrs, threads, kb << 10);
                         }));
  }
  // (2), (3) the strategies through fedl's API, opening the files each time as fedl does.
  struct Row
  {
    std::string spec;
    double seconds;
  };
  std::vector<Row> rows;
  for (const char* spec : {"fedavg", "median", "trimmed-mean:0.1", "krum:1"}) {
    const auto s = parse_strategy(spec);
    const double t = time_runs([&] {
      auto o = open_files(dir, args.n);
      ServerState state;
      const auto out = aggregate(*o.base, o.ptrs, o.weights, s, {}, state);
      sink = sink + static_cast<float>(out.size());
    });
    rows.push_back({spec, t});
  }
  // (4) peak RSS of fedavg in a fresh process.
  std::vector<std::pair<std::size_t, std::optional<RssResult>>> rss;
  for (const auto n : args.rss_n) {
    rss.emplace_back(n, measure_rss(dir, n));
  }
  // (5) NumPy.
  std::optional<double> t_numpy;
  std::string numpy_note;
  if (!args.numpy.empty()) {
    t_numpy = run_numpy(args.numpy, dir, args.n, args.repeat, numpy_note);
  } else {
    numpy_note = "skipped (--no-numpy)";
  }

  const auto gbs = [&](double t) { return update_bytes / t / 1e9; };
  // (1), the memory read bandwidth: the faster of the two read-sums (either may win: populated
  // mappings skip the page faults, fresh ones may be mapped with larger pages).
  const double t_base = std::min(t_read, t_read_warm);
  std::printf("fedl aggregate benchmark\n");
  std::printf("machine: %s, nproc %u (threads used: %u)\n", cpu_model().c_str(), threads, threads);
  std::printf("data:    N = %zu updates x P = %zu F32 params in %zu tensors = %.1f MB of update data, "
              "page cache warm; median of %zu runs\n",
              args.n, args.params, args.tensors, update_bytes / 1e6, args.repeat);
  std::printf("         every fedl run opens (mmaps) the files afresh, as `fedl aggregate` does\n\n");
  std::printf("%-62s %9s %8s %8s\n", "measurement", "time ms", "GB/s", "of (1)");
  std::printf("%-62s %9.1f %8.2f %8s\n", "(1) memory read bandwidth: read-sum of the mapped updates", t_base * 1e3,
              gbs(t_base), "100%");
  std::printf("%-62s %9.1f %8.2f %7.0f%%\n", "    read-sum, mappings already populated", t_read_warm * 1e3,
              gbs(t_read_warm), 100.0 * t_base / t_read_warm);
  std::printf("%-62s %9.1f %8.2f %7.0f%%\n", "    read-sum through fresh mappings (page faults included)", t_read * 1e3,
              gbs(t_read), 100.0 * t_base / t_read);
  for (const auto& [kb, t] : t_pread) {
    const auto label = fmt::format("(1b) read-sum, pread {} KB chunks into a huge-page buffer", kb);
    std::printf("%-62s %9.1f %8.2f %7.0f%%\n", label.c_str(), t * 1e3, gbs(t), 100.0 * t_base / t);
  }
  for (const auto& r : rows) {
    const auto label = r.spec == "fedavg"
                         ? "(2) fedavg via fedl::core::aggregate"
                         : (r.spec == "krum:1" ? "    krum:1 (N^2/2 distances; for information)" : "(3) " + r.spec);
    std::printf("%-62s %9.1f %8.2f %7.0f%%\n", std::string(label).c_str(), r.seconds * 1e3, gbs(r.seconds),
                100.0 * t_base / r.seconds);
  }
  if (t_numpy) {
    std::printf("%-62s %9.1f %8.2f %7.0f%%\n", "(5) NumPy weighted average (aggregate_numpy.py, faster loader)",
                *t_numpy * 1e3, gbs(*t_numpy), 100.0 * t_base / *t_numpy);
  } else {
    std::printf("(5) NumPy baseline not measured: %s\n", numpy_note.c_str());
  }
  std::printf("\nfedavg: %.0f%% of the read bandwidth (1) (target >= 50%%)", 100.0 * t_base / rows[0].seconds);
  if (t_numpy) {
    std::printf("; %.1fx faster than NumPy (target >= 3x)", *t_numpy / rows[0].seconds);
  }
  std::printf("\n\n");
  std::printf("(4) peak RSS of one fedavg run in a fresh child process (P = %zu, model %.1f MB)\n", args.params,
              model_mb);
  std::printf("%6s %16s %16s %22s %6s\n", "N", "RSS open (MB)", "peak RSS (MB)", "limit 3*model+50 (MB)", "ok");
  for (const auto& [n, r] : rss) {
    const double limit = 3 * model_mb + 50;
    if (r) {
      const double peak = static_cast<double>(r->peak_kb) * 1024 / 1e6;
      std::printf("%6zu %16.1f %16.1f %22.1f %6s\n", n, static_cast<double>(r->before_kb) * 1024 / 1e6, peak, limit,
                  peak <= limit ? "yes" : "NO");
    } else {
      std::printf("%6zu %16s %16s %22.1f %6s\n", n, "-", "failed", limit, "?");
    }
  }
  if (!args.keep) {
    for (std::size_t i = 0; i < files_needed; ++i) {
      fs::remove(update_path(dir, i));
    }
    fs::remove(dir / "base.safetensors");
    if (made_dir) {
      fs::remove(dir);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "fedl_aggregate_bench: error: %s\n", e.what());
  return 1;
}
