// SPDX-License-Identifier: Apache-2.0
// The fork server (core/net/fork_server.hpp), run in a child process of the test: its children,
// their statuses, requesters that go away, malformed and foreign requests, one server per socket,
// the idle exit.
#include "core/net/fork_server.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace fedl::core;
using fedl::test::TempDir;
namespace fs = std::filesystem;

namespace {

// What the server's children do: argv[0] "echo" writes the other words to stdout and exits 7;
// "sleep" sleeps for argv[1] seconds.
int
test_child(const std::vector<std::string>& argv)
{
  if (argv.at(0) == "sleep") {
    std::this_thread::sleep_for(std::chrono::duration<double>(std::stod(argv.at(1))));
    return 0;
  }
  std::string out;
  for (std::size_t i = 1; i < argv.size(); ++i) {
    out += argv[i] + (i + 1 < argv.size() ? " " : "\n");
  }
  (void)::write(STDOUT_FILENO, out.data(), out.size());
  return 7;
}

// A fork server on `socket` in a child process of the test; waits until it listens.
pid_t
start_server(const fs::path& socket, double idle = 30)
{
  const pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 1;
    try {
      rc = run_fork_server(socket, idle, {}, test_child);
    } catch (...) {
    }
    ::_exit(rc);
  }
  for (int i = 0; i < 500 && !fs::exists(socket); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pid;
}

int
wait_exit(pid_t pid)
{
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

struct Pipe
{
  int r = -1;
  int w = -1;
  Pipe() { REQUIRE(::pipe2(&r, O_CLOEXEC) == 0); }
  ~Pipe()
  {
    ::close(r);
    ::close(w);
  }
  std::string read_all()
  {
    ::close(std::exchange(w, -1));
    std::string s;
    char buf[256];
    for (ssize_t n; (n = ::read(r, buf, sizeof(buf))) > 0;) {
      s.append(buf, static_cast<std::size_t>(n));
    }
    return s;
  }
};

// A raw connection to the server's socket.
int
connect_raw(const fs::path& socket)
{
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, socket.c_str(), sizeof(a.sun_path) - 1);
  REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0);
  return fd;
}

const std::vector<std::string> no_start{"/bin/false"};

} // namespace

TEST_CASE("fork server: a child per request, with the requester's stdout, and its status afterwards")
{
  const TempDir dir;
  const auto socket = dir / "fork.sock";
  const pid_t server = start_server(socket);
  CHECK((fs::status(socket).permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write));
  for (int i = 0; i < 3; ++i) {
    Pipe out;
    const auto child =
      fork_via_server(socket, {"echo", "hello", std::to_string(i)}, STDIN_FILENO, out.w, STDERR_FILENO, no_start);
    CHECK(child.pid > 0);
    CHECK(child.pid != server);
    CHECK(out.read_all() == "hello " + std::to_string(i) + "\n");
    const auto status = forked_child_status(child.connection.get(), 5000);
    REQUIRE(status);
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 7);
  }

  SUBCASE("a requester that goes away has its child stopped")
  {
    Pipe out;
    auto child = fork_via_server(socket, {"sleep", "30"}, STDIN_FILENO, out.w, STDERR_FILENO, no_start);
    CHECK_FALSE(forked_child_status(child.connection.get(), 0));
    CHECK(::kill(child.pid, 0) == 0);
    child.connection.reset();
    bool gone = false;
    for (int i = 0; i < 300 && !gone; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      gone = ::kill(child.pid, 0) != 0;
    }
    CHECK(gone);
  }
  SUBCASE("malformed requests close their connection and nothing else")
  {
    for (const auto& junk : {std::string("\x05\0\0\0hello", 9), std::string("\xff\xff\xff\x7f", 4),
                             std::string("\x0b\0\0\0{\"argv\":[]}", 15)}) {
      const int fd = connect_raw(socket);
      // No descriptors come with these: the request is refused whatever it says.
      (void)::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
      char c = 0;
      CHECK(::recv(fd, &c, 1, 0) <= 0); // closed (reset, if the server left bytes unread)
      ::close(fd);
    }
    Pipe out;
    const auto child = fork_via_server(socket, {"echo", "still"}, STDIN_FILENO, out.w, STDERR_FILENO, no_start);
    CHECK(out.read_all() == "still\n");
  }
  SUBCASE("one server per socket: a second one returns at once")
  {
    CHECK(run_fork_server(
            socket, 30, [] { FAIL("a second server prepared"); }, test_child) == 0);
  }
  SUBCASE("another user is refused")
  {
    if (::geteuid() != 0) {
      MESSAGE("not root: cannot try another user");
      return;
    }
    const pid_t other = ::fork();
    if (other == 0) {
      if (::setuid(65534) != 0) {
        ::_exit(2);
      }
      try {
        (void)fork_via_server(socket, {"echo", "x"}, STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO, no_start, 1);
      } catch (const Error&) {
        ::_exit(0); // refused: the socket is 0600 (or the server closes on SO_PEERCRED)
      }
      ::_exit(1);
    }
    const int status = wait_exit(other);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  ::kill(server, SIGKILL); // not SIGTERM: the test runner's handlers are the server's too
  wait_exit(server);
}

TEST_CASE("fork server: exits when idle and takes its socket along; bad socket paths are refused")
{
  const TempDir dir;
  const auto socket = dir / "idle.sock";
  const pid_t server = start_server(socket, 0.3);
  REQUIRE(fs::exists(socket));
  const int status = wait_exit(server);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK_FALSE(fs::exists(socket));
  // Nobody listens, and the server named to start one fails (a clear error at once) or says it
  // started but never listens (a clear error in time).
  CHECK_THROWS_WITH_AS(fork_via_server(socket, {"echo"}, 0, 1, 2, no_start, 30), doctest::Contains("could not start"),
                       Error);
  CHECK_THROWS_WITH_AS(fork_via_server(socket, {"echo"}, 0, 1, 2, {"/bin/true"}, 0.2),
                       doctest::Contains("did not start within"), Error);
  CHECK_THROWS_AS(run_fork_server(dir / std::string(200, 'x'), 1, {}, test_child), UsageError);

  // A `prepare` that leaves a thread behind: refused, since a fork would not copy it.
  const pid_t threaded = ::fork();
  if (threaded == 0) {
    int rc = 1;
    try {
      (void)run_fork_server(
        dir / "threaded.sock", 30, [] { std::thread([] { ::pause(); }).detach(); }, test_child);
    } catch (const Error& e) {
      rc = std::string(e.what()).find("it can only fork with") != std::string::npos ? 42 : 2;
    }
    ::_exit(rc);
  }
  const int refused = wait_exit(threaded);
  CHECK(WIFEXITED(refused));
  CHECK(WEXITSTATUS(refused) == 42);
  CHECK_FALSE(fs::exists(dir / "threaded.sock"));
}
