// SPDX-License-Identifier: Apache-2.0
// fedl_tls_push_bench: the transport's own limit for a networked round (DESIGN §8): one mutual
// TLS 1.3 push of the same bytes a round moves, over 127.0.0.1, through the same code the
// coordinator and the sites use (core::TlsContext, TlsStream and FramedConnection), with
// certificates made in code (core/trust/pki.hpp). No files, no training, no aggregation, no ledger.
//
// One process, two threads, each running one io_context as serve and join do: the "server"
// thread holds N accepted connections (as `fedl serve`), the "client" thread the N sites' ends
// (as N `fedl join` would, on the other core). A round is:
//   down  the server queues a task frame whose body is the P × 4-byte model (sent from one
//         buffer, as the coordinator sends from its mapped model file) to every client; each
//         client reads it into its own buffer (as the site does);
//   up    as soon as a client has the whole model it sends an update frame of P × 4 bytes back;
//         the server reads each body into a sink (nowhere by default, or a file per site under
//         --dir, as the coordinator writes state/incoming/*.part).
// The round ends when the server has every update. Printed: the medians over --repeat rounds
// (after --warmup untimed ones) of the round time, of "down" (first task queued to last model
// received) and MB/s (payload bytes both ways / round time); the CPU time per round of the
// process (user and system, both ends: steadier than wall time on a shared machine); and the
// handshake time of the N connections (TCP connect + mutual TLS 1.3, Ed25519 certificates).
//
// Usage: fedl_tls_push_bench [--n 10] [--params 1000000] [--repeat 15] [--warmup 3]
//                            [--dir DIR] [--json] [--read-ahead-kb K] [--ciphersuites LIST]
// --read-ahead-kb and --ciphersuites set what-if options on both SSL_CTXs, to measure a change
// to core/net/tls.cpp before making it: OpenSSL read-ahead with a K KiB read buffer (one read()
// takes many records instead of two reads per 16 KiB record), and the TLS 1.3 suites offered
// (OpenSSL's default order negotiates TLS_AES_256_GCM_SHA384).
#include "bench_util.hpp"
#include "core/net/connection.hpp"
#include "core/net/tls.hpp"
#include "core/trust/pki.hpp"
#include "core/util/error.hpp"

#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <openssl/ssl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using namespace fedl::core;
using json = nlohmann::json;
using tcp = asio::ip::tcp;

namespace {

struct Args
{
  std::size_t n = 10;
  std::size_t params = 1'000'000;
  std::size_t repeat = 15;
  std::size_t warmup = 3;
  std::string dir;
  bool json_out = false;
  // What-if settings on both SSL_CTXs (not what fedl serve and join use today): OpenSSL read-ahead
  // with a read buffer of this many KiB (0: off, as core/net/tls.cpp), and the TLS 1.3 cipher suites.
  std::size_t read_ahead_kb = 0;
  std::string ciphersuites;
};

const char* const k_usage =
  "usage: fedl_tls_push_bench [--n N] [--params P] [--repeat R] [--warmup W] [--dir DIR] [--json]\n"
  "                           [--read-ahead-kb K] [--ciphersuites LIST]\n";

Args
parse_args(int argc, char** argv)
{
  fedl::bench::CommandLine cl(argc, argv, "fedl_tls_push_bench", k_usage);
  Args a;
  while (cl.next()) {
    const auto& flag = cl.flag();
    if (flag == "--n") {
      a.n = cl.count();
    } else if (flag == "--params") {
      a.params = cl.count();
    } else if (flag == "--repeat") {
      a.repeat = cl.count();
    } else if (flag == "--warmup") {
      a.warmup = cl.count(true);
    } else if (flag == "--dir") {
      a.dir = cl.value();
    } else if (flag == "--read-ahead-kb") {
      a.read_ahead_kb = cl.count(true);
    } else if (flag == "--ciphersuites") {
      a.ciphersuites = cl.value();
    } else if (flag == "--json") {
      a.json_out = true;
    } else {
      cl.fail("unknown option " + flag);
    }
  }
  return a;
}

double
now()
{
  return FramedConnection::now();
}

using fedl::bench::median;

// State shared by the two threads; guarded by `mutex` where both touch it.
struct Bench
{
  Args args;
  std::vector<std::byte> model;  // what the server sends (the coordinator's mapped model)
  std::vector<std::byte> update; // what every client sends back

  asio::io_context server_io;
  asio::io_context client_io;
  std::shared_ptr<TlsContext> server_tls;
  std::shared_ptr<TlsContext> client_tls;
  tcp::acceptor acceptor{server_io};

  // Server side (server thread only).
  std::vector<std::shared_ptr<FramedConnection>> server_conns;
  std::vector<int> part_fds;
  std::size_t hellos = 0;
  std::size_t updates = 0;
  std::uint64_t round = 0;
  double round_started = 0;

  // Client side (client thread only).
  std::vector<std::shared_ptr<FramedConnection>> client_conns;
  std::size_t tasks_in = 0;

  // Handed between threads.
  std::mutex mutex;
  std::condition_variable cv;
  bool all_ready = false;
  bool round_done = false;
  double last_task_in = 0; // when the last client had its whole model (client thread)
  double round_end = 0;
  std::string failure;
  std::atomic<bool> stopping{false};

  void fail(const std::string& why)
  {
    const std::lock_guard lock(mutex);
    if (failure.empty()) {
      failure = why;
    }
    cv.notify_all();
  }
};

FrameLimits
server_limits(std::uint64_t max_body)
{
  FrameLimits l;
  l.allow(FrameType::hello).allow(FrameType::update, max_body).allow(FrameType::heartbeat).allow(FrameType::error);
  return l;
}

FrameLimits
client_limits(std::uint64_t max_body)
{
  FrameLimits l;
  l.allow(FrameType::welcome)
    .allow(FrameType::task, max_body)
    .allow(FrameType::heartbeat)
    .allow(FrameType::done)
    .allow(FrameType::error);
  return l;
}

void
accept_next(Bench& b)
{
  b.acceptor.async_accept([&b](const std::error_code& ec, tcp::socket socket) {
    if (ec) {
      b.fail("accept failed: " + ec.message());
      return;
    }
    const std::size_t index = b.server_conns.size();
    FramedConnection::Callbacks cb;
    cb.on_head = [&b, index](const FramePrefix&, const json&) {
      return FramedConnection::BodySink{nullptr, b.part_fds.empty() ? -1 : b.part_fds[index]};
    };
    cb.on_frame = [&b, index](FrameType type, json&, const FramedConnection::BodySink&) {
      if (type == FrameType::hello) {
        if (++b.hellos == b.args.n) {
          const std::lock_guard lock(b.mutex);
          b.all_ready = true;
          b.cv.notify_all();
        }
      } else if (type == FrameType::update) {
        if (!b.part_fds.empty()) {
          // Emptied for the next round, which writes it afresh (as a new .part file would be).
          if (::ftruncate(b.part_fds[index], 0) != 0 || ::lseek(b.part_fds[index], 0, SEEK_SET) != 0) {
            b.fail(fmt::format("cannot empty an update file: {}", std::strerror(errno)));
          }
        }
        if (++b.updates == b.args.n) {
          const std::lock_guard lock(b.mutex);
          b.round_done = true;
          b.round_end = now();
          b.cv.notify_all();
        }
      }
    };
    cb.on_close = [&b](const std::string& reason) {
      if (!b.stopping) {
        b.fail("server side closed: " + reason);
      }
    };
    auto conn = std::make_shared<FramedConnection>(std::make_unique<TlsStream>(std::move(socket), b.server_tls),
                                                   server_limits(b.update.size() + (1 << 20)), cb);
    b.server_conns.push_back(conn);
    conn->start();
    if (b.server_conns.size() < b.args.n) {
      accept_next(b);
    }
  });
}

void
connect_clients(Bench& b, const tcp::endpoint& where)
{
  for (std::size_t i = 0; i < b.args.n; ++i) {
    auto socket = std::make_shared<tcp::socket>(b.client_io);
    socket->async_connect(where, [&b, socket, i](const std::error_code& ec) {
      if (ec) {
        b.fail("connect failed: " + ec.message());
        return;
      }
      FramedConnection::Callbacks cb;
      // Each site reads the model into its own buffer, as fedl join does.
      auto buffer = std::make_shared<std::vector<std::byte>>();
      cb.on_ready = [&b, i] {
        b.client_conns[i]->send(FrameType::hello,
                                {{"site", fmt::format("site-{}", i + 1)}, {"version", protocol_version}});
      };
      cb.on_head = [buffer](const FramePrefix&, const json&) { return FramedConnection::BodySink{buffer, -1}; };
      cb.on_frame = [&b, i](FrameType type, json& header, const FramedConnection::BodySink&) {
        if (type != FrameType::task) {
          return;
        }
        if (++b.tasks_in == b.args.n) {
          const std::lock_guard lock(b.mutex);
          b.last_task_in = now();
        }
        const std::span<const std::byte> body(b.update);
        b.client_conns[i]->send(
          FrameType::update, {{"round", header.value("round", 0)}, {"task", header.value("task", 0)}, {"attempt", 1}},
          {body});
      };
      cb.on_close = [&b](const std::string& reason) {
        if (!b.stopping) {
          b.fail("client side closed: " + reason);
        }
      };
      auto stream = std::make_unique<TlsStream>(std::move(*socket), b.client_tls);
      b.client_conns[i] =
        std::make_shared<FramedConnection>(std::move(stream), client_limits(b.model.size() + (1 << 20)), cb);
      b.client_conns[i]->start();
    });
  }
}

// Starts a round on the server thread: the task frame to every site, from one buffer.
void
start_round(Bench& b)
{
  ++b.round;
  b.updates = 0;
  b.round_started = now();
  const std::span<const std::byte> body(b.model);
  for (auto& c : b.server_conns) {
    c->send(
      FrameType::task,
      {{"round", b.round}, {"attempt", 1}, {"task", b.round}, {"deadline", 600.0}, {"seed", 1}, {"base_sha256", ""}},
      {body});
  }
}

// User and system CPU seconds of this process so far (both threads).
std::pair<double, double>
cpu_seconds()
{
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const auto sec = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return {sec(ru.ru_utime), sec(ru.ru_stime)};
}

long
peak_rss_kb()
{
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

} // namespace

int
main(int argc, char** argv)
{
  auto b = std::make_unique<Bench>();
  b->args = parse_args(argc, argv);
  const auto& a = b->args;
  try {
    // The federation's PKI, made in memory: an Ed25519 CA, the coordinator's certificate for
    // 127.0.0.1, one client certificate (the server checks the chain, not the name).
    const Validity validity{};
    const auto ca = create_ca("fedl bench CA", validity);
    const std::vector<std::string> names{"127.0.0.1"};
    const auto server_id = issue_server_certificate(ca, names, validity);
    const auto client_id = issue_client_certificate(ca, "site-1", validity);
    b->server_tls = TlsContext::server(server_id, ca.cert, nullptr);
    b->client_tls = TlsContext::client(client_id, ca.cert, "127.0.0.1");
    for (auto* ctx : {b->server_tls->native(), b->client_tls->native()}) {
      if (a.read_ahead_kb > 0) {
        SSL_CTX_set_read_ahead(ctx, 1);
        SSL_CTX_set_default_read_buffer_len(ctx, a.read_ahead_kb * 1024);
      }
      if (!a.ciphersuites.empty() && SSL_CTX_set_ciphersuites(ctx, a.ciphersuites.c_str()) != 1) {
        fedl::bench::usage_error(
          "fedl_tls_push_bench", k_usage,
          fmt::format("--ciphersuites {}: not a TLS 1.3 cipher suite list OpenSSL accepts", a.ciphersuites));
      }
    }

    const std::size_t bytes = a.params * 4;
    b->model.resize(bytes);
    b->update.resize(bytes);
    for (std::size_t i = 0; i < bytes; ++i) { // not zeros: no page is left unmapped
      b->model[i] = static_cast<std::byte>(i * 131 + 7);
      b->update[i] = static_cast<std::byte>(i * 97 + 3);
    }
    if (!a.dir.empty()) {
      fs::create_directories(a.dir);
      for (std::size_t i = 0; i < a.n; ++i) {
        const auto path = fs::path(a.dir) / fmt::format("site-{}.part", i + 1);
        const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) {
          throw Error("cannot create {}: {}", path.string(), std::strerror(errno));
        }
        b->part_fds.push_back(fd);
      }
    }

    const tcp::endpoint listen_at(asio::ip::make_address("127.0.0.1"), 0);
    b->acceptor.open(listen_at.protocol());
    b->acceptor.set_option(tcp::acceptor::reuse_address(true));
    b->acceptor.bind(listen_at);
    b->acceptor.listen(static_cast<int>(std::max<std::size_t>(a.n, 128)));
    const auto where = b->acceptor.local_endpoint();
    b->client_conns.resize(a.n);

    // Handshakes: N connections, timed from the first connect to the last hello received.
    const double t_connect = now();
    accept_next(*b);
    connect_clients(*b, where);
    auto server_guard = asio::make_work_guard(b->server_io);
    auto client_guard = asio::make_work_guard(b->client_io);
    std::thread server_thread([&] { b->server_io.run(); });
    std::thread client_thread([&] { b->client_io.run(); });
    {
      std::unique_lock lock(b->mutex);
      b->cv.wait(lock, [&] { return b->all_ready || !b->failure.empty(); });
    }
    const double handshake_s = now() - t_connect;

    std::vector<double> round_s;
    std::vector<double> down_s;
    std::pair<double, double> cpu_start{};
    for (std::size_t r = 0; r < a.warmup + a.repeat && b->failure.empty(); ++r) {
      {
        const std::lock_guard lock(b->mutex);
        b->round_done = false;
      }
      // Let the reset reach the client thread before the round starts.
      {
        std::promise<void> reset;
        auto done = reset.get_future();
        asio::post(b->client_io, [&] {
          b->tasks_in = 0;
          reset.set_value();
        });
        done.wait();
      }
      if (r == a.warmup) {
        cpu_start = cpu_seconds();
      }
      double started = 0;
      {
        std::promise<double> go;
        auto f = go.get_future();
        asio::post(b->server_io, [&] {
          start_round(*b);
          go.set_value(b->round_started);
        });
        started = f.get();
      }
      std::unique_lock lock(b->mutex);
      if (!b->cv.wait_for(lock, std::chrono::seconds(300), [&] { return b->round_done || !b->failure.empty(); })) {
        b->failure = "a round took more than 300 s";
      }
      if (!b->failure.empty()) {
        break;
      }
      if (r >= a.warmup) {
        round_s.push_back(b->round_end - started);
        down_s.push_back(b->last_task_in - started);
      }
    }

    const auto cpu_end = cpu_seconds();
    const double user_ms = (cpu_end.first - cpu_start.first) * 1e3 / static_cast<double>(a.repeat);
    const double sys_ms = (cpu_end.second - cpu_start.second) * 1e3 / static_cast<double>(a.repeat);
    // Close everything on its own thread, then stop both loops.
    b->stopping = true;
    asio::post(b->server_io, [&] {
      for (auto& c : b->server_conns) {
        c->close("bench done");
      }
      b->acceptor.close();
    });
    asio::post(b->client_io, [&] {
      for (auto& c : b->client_conns) {
        if (c) {
          c->close("bench done");
        }
      }
    });
    server_guard.reset();
    client_guard.reset();
    server_thread.join();
    client_thread.join();
    for (const int fd : b->part_fds) {
      ::close(fd);
    }
    if (!a.dir.empty()) {
      for (std::size_t i = 0; i < a.n; ++i) {
        std::error_code ec;
        fs::remove(fs::path(a.dir) / fmt::format("site-{}.part", i + 1), ec);
      }
    }
    if (!b->failure.empty()) {
      throw Error("{}", b->failure);
    }

    const double round_med = median(round_s);
    const double down_med = median(down_s);
    const double moved = 2.0 * static_cast<double>(a.n) * static_cast<double>(bytes); // both ways
    const double mbps = moved / round_med / 1e6;
    const double down_mbps = static_cast<double>(a.n) * static_cast<double>(bytes) / down_med / 1e6;
    if (a.json_out) {
      const json j = {{"n", a.n},
                      {"params", a.params},
                      {"model_bytes", bytes},
                      {"repeat", a.repeat},
                      {"round_ms", round_med * 1e3},
                      {"round_ms_min", *std::min_element(round_s.begin(), round_s.end()) * 1e3},
                      {"round_ms_max", *std::max_element(round_s.begin(), round_s.end()) * 1e3},
                      {"down_ms", down_med * 1e3},
                      {"up_ms", (round_med - down_med) * 1e3},
                      {"mb_per_s", mbps},
                      {"down_mb_per_s", down_mbps},
                      {"handshake_ms", handshake_s * 1e3},
                      {"cpu_user_ms", user_ms},
                      {"cpu_sys_ms", sys_ms},
                      {"sink", a.dir.empty() ? "none" : "file"},
                      {"read_ahead_kb", a.read_ahead_kb},
                      {"ciphersuites", a.ciphersuites.empty() ? "default" : a.ciphersuites},
                      {"peak_rss_mb", static_cast<double>(peak_rss_kb()) / 1024.0}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("mTLS 1.3 push over 127.0.0.1 (FramedConnection), N = %zu, P = %zu (%.1f MB model), "
                  "updates to %s, %zu rounds after %zu warm-up%s\n",
                  a.n, a.params, static_cast<double>(bytes) / 1e6, a.dir.empty() ? "nowhere" : "files", a.repeat,
                  a.warmup,
                  a.read_ahead_kb == 0 && a.ciphersuites.empty()
                    ? ""
                    : fmt::format(" (what-if: read-ahead {} KiB, suites {})", a.read_ahead_kb,
                                  a.ciphersuites.empty() ? "default" : a.ciphersuites)
                        .c_str());
      std::printf("  round (N models out, N updates in)  median %8.1f ms  (min %.1f, max %.1f)\n", round_med * 1e3,
                  *std::min_element(round_s.begin(), round_s.end()) * 1e3,
                  *std::max_element(round_s.begin(), round_s.end()) * 1e3);
      std::printf("  down (last model received)          median %8.1f ms  %8.0f MB/s\n", down_med * 1e3, down_mbps);
      std::printf("  both ways                           %8.0f MB/s (%.1f MB per round)\n", mbps, moved / 1e6);
      std::printf("  CPU per round (both threads)        %8.1f ms user + %.1f ms system (mean)\n", user_ms, sys_ms);
      std::printf("  %zu handshakes (connect + mutual TLS 1.3, Ed25519)  %.1f ms\n", a.n, handshake_s * 1e3);
      std::printf("  peak RSS of this process            %.0f MB\n", static_cast<double>(peak_rss_kb()) / 1024.0);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fedl_tls_push_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
