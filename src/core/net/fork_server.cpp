// SPDX-License-Identifier: Apache-2.0
#include "core/net/fork_server.hpp"

#include "core/net/child.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

constexpr int request_fds = 3;

// The threads a process has of its own: one, and a thread sanitizer's.
#if defined(__SANITIZE_THREAD__)
constexpr std::size_t own_threads = 2;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr std::size_t own_threads = 2;
#else
constexpr std::size_t own_threads = 1;
#endif
#else
constexpr std::size_t own_threads = 1;
#endif

// The threads of this process: a fork copies only the calling one, so the server may fork only
// while it is alone (a backend that started a pool on loading would break its children).
std::size_t
thread_count()
{
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (const dirent* e = ::readdir(d)) {
      n += e->d_name[0] != '.' ? 1 : 0;
    }
    ::closedir(d);
  }
  return n;
}

sockaddr_un
address_of(const fs::path& socket)
{
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const auto& s = socket.native();
  if (s.empty() || s.size() >= sizeof(a.sun_path)) {
    throw UsageError("the fork server's socket path {} is {} bytes; a Unix socket path has 1 to {} (choose a "
                     "shorter one)",
                     socket.string(), s.size(), sizeof(a.sun_path) - 1);
  }
  std::memcpy(a.sun_path, s.c_str(), s.size());
  return a;
}

// All `size` bytes through `step` (send or recv on a socket, without SIGPIPE); false if the peer
// went away or the socket failed first.
template<typename Step>
bool
all_of_it(Step step, std::size_t size)
{
  for (std::size_t done = 0; done < size;) {
    const auto n = step(done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return true;
}

bool
write_all(int fd, const void* data, std::size_t size)
{
  const auto* p = static_cast<const char*>(data);
  return all_of_it([&](std::size_t done) { return ::send(fd, p + done, size - done, MSG_NOSIGNAL); }, size);
}

bool
read_all(int fd, void* data, std::size_t size)
{
  auto* p = static_cast<char*>(data);
  return all_of_it([&](std::size_t done) { return ::recv(fd, p + done, size - done, 0); }, size);
}

// The protocol's i32le fields.
using I32 = std::array<std::byte, 4>;

void
put_i32(I32& out, std::int32_t v)
{
  put_le(out.data(), static_cast<std::uint32_t>(v), out.size());
}

std::int32_t
get_i32(const I32& in)
{
  return static_cast<std::int32_t>(static_cast<std::uint32_t>(get_le(in.data(), in.size())));
}

// One request: argv and the child's three descriptors; nothing for anything malformed (the
// descriptors that came with it are closed).
struct Request
{
  std::vector<std::string> argv;
  std::array<UniqueFd, request_fds> fds;
};

// A request's 4-byte size with room for its descriptors, as sendmsg and recvmsg take them.
struct SizeMessage
{
  I32 size{};
  iovec iov{};
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * request_fds)> control{};
  msghdr msg{};

  SizeMessage()
  {
    iov = {size.data(), size.size()};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
  }
  SizeMessage(const SizeMessage&) = delete;
  SizeMessage& operator=(const SizeMessage&) = delete;
};

std::optional<Request>
read_request(int fd)
{
  SizeMessage m;
  auto& msg = m.msg;
  const auto n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  std::vector<UniqueFd> received;
  for (auto* c = CMSG_FIRSTHDR(&msg); n > 0 && c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      const auto count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int got = -1;
        std::memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        received.emplace_back(got);
      }
    }
  }
  const auto length = static_cast<std::uint32_t>(get_i32(m.size));
  if (n != 4 || received.size() != request_fds || (msg.msg_flags & MSG_CTRUNC) != 0 || length == 0 ||
      length > fork_server_max_request) {
    return std::nullopt;
  }
  std::string text(length, '\0');
  if (!read_all(fd, text.data(), text.size())) {
    return std::nullopt;
  }
  const auto j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object() || !j.contains("argv") || !j["argv"].is_array() || j["argv"].empty()) {
    return std::nullopt;
  }
  Request r;
  for (const auto& a : j["argv"]) {
    if (!a.is_string() || a.get_ref<const std::string&>().find('\0') != std::string::npos) {
      return std::nullopt;
    }
    r.argv.push_back(a.get<std::string>());
  }
  for (std::size_t i = 0; i < request_fds; ++i) {
    r.fds[i] = std::move(received[i]);
  }
  return r;
}

// In the forked child: the requester's descriptors as 0, 1 and 2, none of the server's, the
// signals as a new process has them; then the command. Never returns.
[[noreturn]] void
be_child(Request& r, const std::function<int(const std::vector<std::string>&)>& run_child)
{
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) {
      ::signal(sig, SIG_DFL);
    }
  }
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int i = 0; i < request_fds; ++i) {
    if (::dup2(r.fds[static_cast<std::size_t>(i)].get(), i) < 0) {
      ::_exit(127);
    }
  }
  ::close_range(request_fds, ~0U, 0);
  for (auto& fd : r.fds) {
    (void)fd.release(); // closed by close_range
  }
  int rc = 1;
  try {
    rc = run_child(r.argv);
  } catch (...) {
    rc = 1;
  }
  std::fflush(stdout);
  std::fflush(stderr);
  ::_exit(rc);
}

struct Connection
{
  UniqueFd fd;
  pid_t child = -1; // none yet: the request is still to come
};

class Server
{
public:
  Server(const fs::path& socket, double idle, const std::function<int(const std::vector<std::string>&)>& run_child)
    : m_socket(socket), m_idle(idle), m_run_child(run_child)
  {
  }

  void listen()
  {
    const auto a = address_of(m_socket);
    ::unlink(m_socket.c_str()); // a stale socket of a server that died; the lock says none runs
    m_listen.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    const auto old_umask = ::umask(0177);
    const int bound = m_listen ? ::bind(m_listen.get(), reinterpret_cast<const sockaddr*>(&a), sizeof(a)) : -1;
    const int err = errno;
    ::umask(old_umask);
    if (bound != 0 || ::listen(m_listen.get(), 128) != 0) {
      throw Error("cannot listen on {} for the fork server: {}", m_socket.string(), std::strerror(err));
    }
    struct stat st
    {};
    ::stat(m_socket.c_str(), &st);
    m_inode = st.st_ino;
    sigset_t chld;
    ::sigemptyset(&chld);
    ::sigaddset(&chld, SIGCHLD);
    ::sigprocmask(SIG_BLOCK, &chld, nullptr);
    m_signals.reset(::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK));
    std::signal(SIGPIPE, SIG_IGN);
  }

  void run()
  {
    double idle_since = steady_seconds();
    for (;;) {
      std::vector<pollfd> fds{{m_listen.get(), POLLIN, 0}, {m_signals.get(), POLLIN, 0}};
      for (const auto& c : m_conns) {
        fds.push_back({c.fd.get(), POLLIN, 0});
      }
      const int timeout = m_conns.empty() ? static_cast<int>(m_idle * 1000) : -1;
      if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR) {
        throw Error("fork server: poll: {}", std::strerror(errno));
      }
      // Ready connections by descriptor: serving one or reaping a child removes connections.
      std::vector<int> ready;
      for (std::size_t k = 2; k < fds.size(); ++k) {
        if ((fds[k].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
          ready.push_back(fds[k].fd);
        }
      }
      for (const int fd : ready) {
        const auto it =
          std::find_if(m_conns.begin(), m_conns.end(), [fd](const Connection& c) { return c.fd.get() == fd; });
        if (it != m_conns.end()) {
          serve(static_cast<std::size_t>(it - m_conns.begin()));
        }
      }
      if ((fds[1].revents & POLLIN) != 0) {
        reap();
      }
      if ((fds[0].revents & POLLIN) != 0) {
        accept();
      }
      if (!m_conns.empty()) {
        idle_since = steady_seconds();
      } else if (steady_seconds() - idle_since >= m_idle) {
        break;
      }
    }
    struct stat st
    {};
    if (::stat(m_socket.c_str(), &st) == 0 && st.st_ino == m_inode) {
      ::unlink(m_socket.c_str());
    }
  }

private:
  void accept()
  {
    for (;;) {
      UniqueFd fd(::accept4(m_listen.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!fd) {
        return;
      }
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != ::geteuid()) {
        FEDL_LOG_WARN("fork server: refused a connection from user {} (it serves user {} only)", cred.uid, ::geteuid());
        continue;
      }
      // A requester that stalls mid-request must not hold the others up.
      const timeval limit{5, 0};
      ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
      ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
      m_conns.push_back({std::move(fd), -1});
    }
  }

  // A connection is readable: its request, or (with a child) its requester has gone.
  void serve(std::size_t i)
  {
    auto& c = m_conns[i];
    if (c.child > 0) {
      // Nothing more is to come from a requester: readable means it closed (or misbehaves).
      FEDL_LOG_DEBUG("fork server: the requester of pid {} went away; stopping it", c.child);
      ::kill(c.child, SIGKILL);
      m_conns.erase(m_conns.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
    auto request = read_request(c.fd.get());
    if (!request) {
      FEDL_LOG_WARN("fork server: a malformed request; connection closed");
      m_conns.erase(m_conns.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      be_child(*request, m_run_child);
    }
    I32 reply{};
    put_i32(reply, pid > 0 ? pid : -errno);
    if (!write_all(c.fd.get(), reply.data(), reply.size()) || pid < 0) {
      if (pid > 0) {
        ::kill(pid, SIGKILL);
      }
      m_conns.erase(m_conns.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
    c.child = pid;
  }

  // Children that ended: each one's status to its requester.
  void reap()
  {
    signalfd_siginfo info{};
    while (::read(m_signals.get(), &info, sizeof(info)) == sizeof(info)) {
    }
    int status = 0;
    for (pid_t pid; (pid = ::waitpid(-1, &status, WNOHANG)) > 0;) {
      for (auto it = m_conns.begin(); it != m_conns.end(); ++it) {
        if (it->child == pid) {
          I32 out{};
          put_i32(out, status);
          write_all(it->fd.get(), out.data(), out.size());
          m_conns.erase(it);
          break;
        }
      }
    }
  }

  fs::path m_socket;
  double m_idle;
  const std::function<int(const std::vector<std::string>&)>& m_run_child;
  UniqueFd m_listen;
  UniqueFd m_signals;
  ino_t m_inode = 0;
  std::vector<Connection> m_conns;
};

UniqueFd
connect_to(const sockaddr_un& a, int& err)
{
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    err = errno;
    return fd;
  }
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a), sizeof(a)) != 0) {
    err = errno;
    fd.reset();
  }
  return fd;
}

// Connects to the server, starting one if none listens.
UniqueFd
connect_or_start(const fs::path& socket, const std::vector<std::string>& start_server, double wait_seconds)
{
  const auto a = address_of(socket);
  int err = 0;
  if (auto fd = connect_to(a, err)) {
    return fd;
  }
  if (err != ENOENT && err != ECONNREFUSED) {
    throw Error("cannot reach the fork server at {}: {}", socket.string(), std::strerror(err));
  }
  FEDL_LOG_INFO("starting a fork server at {}", socket.string());
  UniqueFd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
  // `fedl __fork-server --detach` returns once its server listens (or another one holds the
  // socket), and fails if it could not start; the server goes on alone.
  const pid_t starter = spawn_process(start_server, null.get(), null.get());
  int status = 0;
  while (::waitpid(starter, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw Error("the fork server at {} could not start (its messages above say why)", socket.string());
  }
  const double deadline = steady_seconds() + wait_seconds;
  for (;;) {
    if (auto fd = connect_to(a, err)) {
      return fd;
    }
    if (steady_seconds() > deadline) {
      throw Error("the fork server at {} did not start within {:g} s: {}", socket.string(), wait_seconds,
                  std::strerror(err));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

} // namespace

void
check_socket_path(const fs::path& socket)
{
  (void)address_of(socket);
}

int
run_fork_server(const fs::path& socket, double idle_seconds, const std::function<void()>& prepare,
                const std::function<int(const std::vector<std::string>&)>& run_child,
                const std::function<void()>& listening)
{
  check_socket_path(socket);
  const auto lock_path = socket.string() + ".lock";
  UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock) {
    throw Error("cannot open {}: {}", lock_path, std::strerror(errno));
  }
  if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
    FEDL_LOG_DEBUG("fork server: another one holds {}", lock_path);
    return 0;
  }
  if (prepare) {
    prepare();
  }
  if (const auto threads = thread_count(); threads != own_threads) {
    throw Error("the fork server has {} threads after loading the backends; it can only fork with {}", threads,
                own_threads);
  }
  Server server(socket, idle_seconds, run_child);
  server.listen();
  FEDL_LOG_INFO("fork server listening on {}", socket.string());
  if (listening) {
    listening();
  }
  server.run();
  FEDL_LOG_INFO("fork server on {}: idle for {:g} s; exiting", socket.string(), idle_seconds);
  return 0;
}

ForkedChild
fork_via_server(const fs::path& socket, const std::vector<std::string>& argv, int stdin_fd, int stdout_fd,
                int stderr_fd, const std::vector<std::string>& start_server, double wait_seconds)
{
  auto fd = connect_or_start(socket, start_server, wait_seconds);
  const std::string text = nlohmann::json{{"argv", argv}}.dump();
  if (text.size() > fork_server_max_request) {
    throw Error("internal: a fork server request of {} bytes", text.size());
  }
  SizeMessage m;
  put_i32(m.size, static_cast<std::int32_t>(text.size()));
  auto& msg = m.msg;
  auto* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * request_fds);
  const std::array<int, request_fds> fds{stdin_fd, stdout_fd, stderr_fd};
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(fds));
  if (::sendmsg(fd.get(), &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(m.size.size()) ||
      !write_all(fd.get(), text.data(), text.size())) {
    throw Error("cannot send a request to the fork server at {}: {}", socket.string(), std::strerror(errno));
  }
  pollfd p{fd.get(), POLLIN, 0};
  I32 reply{};
  if (::poll(&p, 1, 30'000) != 1 || !read_all(fd.get(), reply.data(), reply.size())) {
    throw Error("the fork server at {} did not answer", socket.string());
  }
  const auto pid = get_i32(reply);
  if (pid <= 0) {
    throw Error("the fork server at {} could not start {}: {}", socket.string(), argv[0], std::strerror(-pid));
  }
  return {pid, std::move(fd)};
}

std::optional<int>
forked_child_status(int connection, int timeout_ms)
{
  pollfd p{connection, POLLIN, 0};
  const int r = ::poll(&p, 1, timeout_ms);
  if (r == 0 || (r < 0 && errno == EINTR)) {
    return std::nullopt;
  }
  I32 status{};
  if (r < 0 || !read_all(connection, status.data(), status.size())) {
    return -1;
  }
  return get_i32(status);
}

} // namespace fedl::core
