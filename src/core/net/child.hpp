// SPDX-License-Identifier: Apache-2.0
// A child process that speaks frames (core/net/frame.hpp) over its stdin and stdout: how `fedl join`
// runs its trainer and `fedl serve` its evaluator (`fedl __worker`), so that the network process
// never loads LibTorch and a crash or a leak in training cannot take the connection down.
#pragma once

#include "core/net/frame.hpp"
#include "core/util/file_io.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <sys/types.h>
#include <vector>

namespace fedl::core {

// Where a child comes from when it is not started here: a fork server (core/net/fork_server.hpp)
// at `socket`, started with `start` (`fedl __fork-server --detach SOCKET`) if none listens.
struct ForkServerRef
{
  std::filesystem::path socket;
  std::vector<std::string> start;
};

// A child process speaking frames over its stdin/stdout; its stderr is this process's (its log
// lines go where ours go). Not thread-safe: one thread talks to it.
class WorkerProcess
{
public:
  // Starts argv[0] (a path; no PATH search) with argv, or has the fork server `via` fork it
  // (argv then runs as fedl's command line in a fork of the server). The pipe ends this process
  // keeps are O_CLOEXEC, so a second child does not hold the first one's stdin open. Throws Error
  // if the program cannot be started.
  explicit WorkerProcess(std::vector<std::string> argv, const std::optional<ForkServerRef>& via = std::nullopt);
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;
  WorkerProcess(WorkerProcess&& other) noexcept;
  WorkerProcess& operator=(WorkerProcess&&) = delete;
  // Closes the child's stdin (its signal to finish), waits up to 2 s for it to exit, then
  // SIGKILLs it; always reaps it.
  ~WorkerProcess();

  // Writes one frame to the child's stdin. Throws Error naming the child (and how it ended, if it
  // did) when the pipe is closed; never raises SIGPIPE in this process.
  void send(FrameType type, const nlohmann::json& header, std::span<const std::span<const std::byte>> body = {});

  // Reads one frame from the child's stdout, blocking. Throws Error naming the child and its exit
  // status or signal if it exited or closed its stdout, and ProtocolError (prefixed with the
  // child's name) if it sent a bad frame or one `limits` does not allow.
  Frame receive(const FrameLimits& limits, std::vector<std::byte> reuse = {});

  // The read end of the child's stdout, for poll() in an event loop (readable: receive() has
  // data or end of file to see). Owned by this object.
  int receive_fd() const noexcept { return m_from_child; }

  pid_t pid() const noexcept { return m_pid; }
  // Whether the child has not exited yet (reaps it if it has).
  bool running();
  // "exited with status N" / "was killed by signal N (Killed)", once it has ended.
  std::optional<std::string> exit_description() const;
  // "fedl __worker (pid 123)", for messages.
  std::string name() const;

  // SIGKILL and reap, now. Idempotent.
  void kill();

private:
  // Reaps the child if it has exited within `timeout_ms` (0: just look); true if it is gone.
  bool wait_for_exit(int timeout_ms);
  // The error for a child that closed its pipe: how it ended, or that it is still running.
  [[noreturn]] void throw_gone(const std::string& what);

  std::vector<std::string> m_argv;
  pid_t m_pid = -1;
  int m_to_child = -1;         // the child's stdin
  int m_from_child = -1;       // the child's stdout
  bool m_reaped = false;       // it has exited and been waited for (or reaped elsewhere)
  std::optional<int> m_status; // its wait status, if we collected it
  UniqueFd m_server;           // from a fork server: where its wait status arrives
};

// Starts argv[0] (a path) with argv, stdin and stdout from the given descriptors, stderr this
// process's, no other descriptor, default signal dispositions and an empty signal mask. Throws
// Error if it cannot be started.
pid_t spawn_process(const std::vector<std::string>& argv, int stdin_fd, int stdout_fd);

// "exited with status N", "was killed by signal 9 (Killed)": a wait status, for messages.
std::string describe_wait_status(int status);

// The path of the running executable (/proc/self/exe resolved), to start `fedl __worker`.
// Throws Error if it cannot be read.
std::filesystem::path self_executable();

} // namespace fedl::core
