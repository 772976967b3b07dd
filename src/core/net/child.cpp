// SPDX-License-Identifier: Apache-2.0
#include "core/net/child.hpp"

#include "core/net/fork_server.hpp"
#include "core/util/error.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <utility>

extern char** environ;

namespace fedl::core {

namespace {

void
close_fd(int& fd) noexcept
{
  if (fd >= 0) {
    ::close(fd);
    fd = -1;
  }
}

// Moves `fd` to a number of 3 or more (keeping O_CLOEXEC), so that dup2 onto the child's 0 and 1
// never meets a pipe end that already is 0 or 1 (when this process was started with them closed).
int
above_stdio(int fd)
{
  if (fd > 2) {
    return fd;
  }
  const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  const int saved = errno;
  ::close(fd);
  if (moved < 0) {
    throw Error("cannot create a pipe for a child process: {}", std::strerror(saved));
  }
  return moved;
}

} // namespace

std::string
describe_wait_status(int status)
{
  if (WIFEXITED(status)) {
    return fmt::format("exited with status {}", WEXITSTATUS(status));
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return fmt::format("was killed by signal {} ({}){}", sig, name != nullptr ? name : "unknown",
                       WCOREDUMP(status) ? ", core dumped" : "");
  }
  return fmt::format("ended with wait status {:#x}", status);
}

// The one place a child process is started from a program (the other is a fork server's fork,
// fork_server.cpp be_child): a sandbox for the trainer (namespaces, seccomp, Landlock, or a
// wrapper program such as bwrap put in front of argv) belongs in both.
pid_t
spawn_process(const std::vector<std::string>& argv, int stdin_fd, int stdout_fd)
{
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv) {
    args.push_back(const_cast<char*>(a.c_str()));
  }
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawnattr_init(&attr);
  ::posix_spawn_file_actions_adddup2(&actions, stdin_fd, STDIN_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, stdout_fd, STDOUT_FILENO);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
  // Descriptors opened without O_CLOEXEC (a socket, a lock file) stay with the parent.
  ::posix_spawn_file_actions_addclosefrom_np(&actions, STDERR_FILENO + 1);
#endif
  // An ignored SIGPIPE (which a network process wants) would otherwise pass through exec.
  sigset_t all;
  sigset_t none;
  ::sigfillset(&all);
  ::sigdelset(&all, SIGKILL);
  ::sigdelset(&all, SIGSTOP);
  ::sigemptyset(&none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0].c_str(), &actions, &attr, args.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    throw Error("cannot start {}: {}", argv[0], std::strerror(rc));
  }
  return pid;
}

namespace {

// Blocks SIGPIPE in this thread for its lifetime and discards one that a write raised, so that
// writing to a child that has gone is an EPIPE error whatever this process does with SIGPIPE.
class SigpipeBlock
{
public:
  SigpipeBlock()
  {
    ::sigemptyset(&m_pipe);
    ::sigaddset(&m_pipe, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &m_pipe, &m_old);
    sigset_t pending;
    ::sigpending(&pending);
    m_was_pending = ::sigismember(&pending, SIGPIPE) == 1;
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;
  ~SigpipeBlock()
  {
    if (!m_was_pending) {
      sigset_t pending;
      ::sigpending(&pending);
      if (::sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{};
        while (::sigtimedwait(&m_pipe, nullptr, &zero) < 0 && errno == EINTR) {
        }
      }
    }
    ::pthread_sigmask(SIG_SETMASK, &m_old, nullptr);
  }

private:
  sigset_t m_pipe{};
  sigset_t m_old{};
  bool m_was_pending = false;
};

// Whether the writer of pipe `fd` (our read end) has closed it and nothing is left to read.
bool
writer_gone(int fd)
{
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLHUP) != 0 && (p.revents & POLLIN) == 0;
}

// Whether the reader of pipe `fd` (our write end) has closed it.
bool
reader_gone(int fd)
{
  pollfd p{fd, POLLOUT, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & (POLLERR | POLLHUP)) != 0;
}

} // namespace

WorkerProcess::WorkerProcess(std::vector<std::string> argv, const std::optional<ForkServerRef>& via)
  : m_argv(std::move(argv))
{
  if (m_argv.empty() || m_argv[0].empty()) {
    throw Error("internal: a child process needs a program to run");
  }
  int to_child[2] = {-1, -1};
  int from_child[2] = {-1, -1};
  if (::pipe2(to_child, O_CLOEXEC) != 0) {
    throw Error("cannot create a pipe for {}: {}", m_argv[0], std::strerror(errno));
  }
  if (::pipe2(from_child, O_CLOEXEC) != 0) {
    const int saved = errno;
    close_fd(to_child[0]);
    close_fd(to_child[1]);
    throw Error("cannot create a pipe for {}: {}", m_argv[0], std::strerror(saved));
  }
  try {
    for (int* fd : {&to_child[0], &to_child[1], &from_child[0], &from_child[1]}) {
      const int raised = above_stdio(std::exchange(*fd, -1));
      *fd = raised;
    }
    // Models and updates of megabytes cross these pipes every round: a 1 MiB pipe buffer (the
    // default maximum of /proc/sys/fs/pipe-max-size) instead of 64 KiB cuts the switches between
    // the two processes sixteen-fold. Best effort: a smaller limit only costs speed.
    for (const int fd : {to_child[1], from_child[1]}) {
      (void)::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
    }
    if (via) {
      auto forked = fork_via_server(via->socket, m_argv, to_child[0], from_child[1], STDERR_FILENO, via->start);
      m_pid = forked.pid;
      m_server = std::move(forked.connection);
    } else {
      m_pid = spawn_process(m_argv, to_child[0], from_child[1]);
    }
  } catch (...) {
    for (int* fd : {&to_child[0], &to_child[1], &from_child[0], &from_child[1]}) {
      close_fd(*fd);
    }
    throw;
  }
  // The child's ends are its own now; holding them would hide its exit (no end of file).
  close_fd(to_child[0]);
  close_fd(from_child[1]);
  m_to_child = to_child[1];
  m_from_child = from_child[0];
}

WorkerProcess::WorkerProcess(WorkerProcess&& other) noexcept
  : m_argv(std::move(other.m_argv)),
    m_pid(std::exchange(other.m_pid, -1)),
    m_to_child(std::exchange(other.m_to_child, -1)),
    m_from_child(std::exchange(other.m_from_child, -1)),
    m_reaped(std::exchange(other.m_reaped, true)),
    m_status(std::exchange(other.m_status, std::nullopt)),
    m_server(std::move(other.m_server))
{
}

WorkerProcess::~WorkerProcess()
{
  // End of file on its stdin asks the child to finish; closing its stdout too keeps one that is
  // blocked writing a frame nobody will read from waiting out the grace period.
  close_fd(m_to_child);
  close_fd(m_from_child);
  if (!wait_for_exit(2000)) {
    kill();
  }
}

std::string
WorkerProcess::name() const
{
  std::string what = std::filesystem::path(m_argv.empty() ? "child" : m_argv[0]).filename().string();
  if (m_argv.size() > 1) {
    what += " " + m_argv[1];
  }
  return fmt::format("{} (pid {})", what, m_pid);
}

std::optional<std::string>
WorkerProcess::exit_description() const
{
  if (!m_reaped) {
    return std::nullopt;
  }
  // Reaped elsewhere: SIGCHLD set to SIG_IGN reaps children without a status.
  return m_status ? describe_wait_status(*m_status) : std::string("has ended (its exit status was not kept)");
}

bool
WorkerProcess::wait_for_exit(int timeout_ms)
{
  if (m_server && !m_reaped) {
    // Not our child: the fork server reaps it and sends its status.
    const auto status = forked_child_status(m_server.get(), timeout_ms);
    if (!status) {
      return false;
    }
    m_reaped = true;
    if (*status >= 0) {
      m_status = *status;
    }
    m_server.reset();
    return true;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!m_reaped) {
    int status = 0;
    const pid_t r = ::waitpid(m_pid, &status, WNOHANG);
    if (r == m_pid) {
      m_reaped = true;
      m_status = status;
      break;
    }
    if (r < 0 && errno != EINTR) {
      m_reaped = true; // ECHILD: not ours to wait for any more
      break;
    }
    if (r == 0 && std::chrono::steady_clock::now() >= deadline) {
      return false;
    }
    if (r == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return true;
}

bool
WorkerProcess::running()
{
  return !wait_for_exit(0);
}

void
WorkerProcess::kill()
{
  if (m_reaped || (m_server && wait_for_exit(0))) {
    return;
  }
  ::kill(m_pid, SIGKILL);
  if (m_server) {
    wait_for_exit(10'000);
    return;
  }
  while (!m_reaped) {
    int status = 0;
    const pid_t r = ::waitpid(m_pid, &status, 0);
    if (r == m_pid) {
      m_reaped = true;
      m_status = status;
    } else if (r < 0 && errno != EINTR) {
      m_reaped = true;
    }
  }
}

void
WorkerProcess::throw_gone(const std::string& what)
{
  // Its pipe closes a moment before its exit status can be collected.
  if (wait_for_exit(2000)) {
    throw Error("{} {}: it {} (its messages above say why)", name(), what, *exit_description());
  }
  throw Error("{} {} but is still running", name(), what);
}

void
WorkerProcess::send(FrameType type, const nlohmann::json& header, std::span<const std::span<const std::byte>> body)
{
  if (m_to_child < 0) {
    throw Error("internal: {} has no input pipe (closed or moved)", name());
  }
  try {
    const SigpipeBlock block;
    write_frame(m_to_child, type, header, body);
  } catch (const Error& e) {
    if (reader_gone(m_to_child) || !running()) {
      throw_gone(fmt::format("stopped reading its input before a {} frame", frame_type_name(type)));
    }
    throw Error("{}: {}", name(), e.what());
  }
}

Frame
WorkerProcess::receive(const FrameLimits& limits, std::vector<std::byte> reuse)
{
  if (m_from_child < 0) {
    throw Error("internal: {} has no output pipe (closed or moved)", name());
  }
  std::optional<Frame> frame;
  try {
    frame = read_frame(m_from_child, limits, std::move(reuse));
  } catch (const ProtocolError& e) {
    if (writer_gone(m_from_child)) {
      throw_gone(fmt::format("closed its output inside a frame ({})", e.what()));
    }
    throw ProtocolError(fmt::format("{}: {}", name(), e.what()));
  } catch (const Error& e) {
    throw Error("{}: {}", name(), e.what());
  }
  if (!frame) {
    throw_gone("closed its output");
  }
  return std::move(*frame);
}

std::filesystem::path
self_executable()
{
  std::error_code ec;
  auto path = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    throw Error("cannot find the path of this program from /proc/self/exe: {}; is /proc mounted?", ec.message());
  }
  return path;
}

} // namespace fedl::core
