// SPDX-License-Identifier: Apache-2.0
// A fork server for trainer children: one process per user and host that has loaded the compute
// backend once and forks a `fedl __worker` for each request, so that a new trainer does not pay
// LibTorch's start-up (~0.6 s of CPU, ~60 MB of private pages for its relocations, which the forks
// share until they write them). For many sites on one host (simulations, benchmarks, a gateway
// for several data owners of one account): `fedl join --fork-server SOCKET`.
//
// Protocol, over a Unix stream socket, one connection per child:
//   request   u32le length, then that many bytes of JSON {"argv": [...]}; the first byte
//             carries three descriptors (SCM_RIGHTS): the child's stdin, stdout and stderr
//   reply     i32le: the child's pid, or -errno if it could not be forked
//   then      i32le: its wait status, once it has ended (the server reaps it); the connection
//             then closes. A requester that closes the connection first has its child killed.
// The server serves only its own user (SO_PEERCRED), creates the socket 0600, keeps one instance
// per socket (an flock on SOCKET.lock), forks only while it is single-threaded, and exits once it
// has had no connection and no child for `idle` seconds.
#pragma once

#include "core/util/file_io.hpp"

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

namespace fedl::core {

// UsageError unless `socket` can name a Unix socket (1 to 107 bytes).
void check_socket_path(const std::filesystem::path& socket);

// The longest argv and argument a request may carry.
constexpr std::size_t fork_server_max_request = 256 * 1024;

// Runs the server on `socket` until it has been idle for `idle_seconds`; returns 0, or at once
// (0) if another server holds the socket's lock. `prepare` runs once the lock is held, before
// the socket is made (load the backend there); `listening` once the socket accepts requests.
// `run_child(argv)` runs in each forked child with fds 0, 1 and 2 set to the requester's, and its
// result is the child's exit status. Throws Error if the socket cannot be made, or if this
// process has a thread besides its own after `prepare` (a fork would not copy it).
int run_fork_server(const std::filesystem::path& socket, double idle_seconds, const std::function<void()>& prepare,
                    const std::function<int(const std::vector<std::string>&)>& run_child,
                    const std::function<void()>& listening = {});

// A child started by a fork server: its pid, and the connection its wait status arrives on.
struct ForkedChild
{
  pid_t pid = -1;
  UniqueFd connection;
};

// Asks the server on `socket` to fork `argv` with the given stdin, stdout and stderr. If none
// listens there, starts one with `start_server` (argv of `fedl __fork-server --detach SOCKET`,
// which returns once the server listens, or fails if it cannot start) and waits up to
// `wait_seconds` for it. Throws Error naming the socket.
ForkedChild fork_via_server(const std::filesystem::path& socket, const std::vector<std::string>& argv, int stdin_fd,
                            int stdout_fd, int stderr_fd, const std::vector<std::string>& start_server,
                            double wait_seconds = 60);

// The wait status of a forked child from its connection, waiting up to `timeout_ms` (0: just
// look): the status; nothing yet; or -1 in `status` if the server went away without one.
std::optional<int> forked_child_status(int connection, int timeout_ms);

} // namespace fedl::core
