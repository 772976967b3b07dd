// SPDX-License-Identifier: Apache-2.0
#include "core/net/child.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <string>
#include <unistd.h>

using namespace fedl::core;

namespace {

FrameLimits
echo_limits()
{
  FrameLimits limits;
  limits.allow(FrameType::task, 1 << 20).allow(FrameType::eval, 1 << 20);
  return limits;
}

std::string
text_of(const std::vector<std::byte>& bytes)
{
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// The message of the Error that `fn` throws (Error exactly, not a ProtocolError).
template<typename Fn>
std::string
error_of(Fn&& fn)
{
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

bool
contains(const std::string& text, const std::string& part)
{
  return text.find(part) != std::string::npos;
}

} // namespace

TEST_SUITE_BEGIN("core");

TEST_CASE("core::WorkerProcess talks frames with a child (cat echoes them back)")
{
  WorkerProcess cat({"/bin/cat"});
  CHECK(cat.pid() > 0);
  CHECK(cat.running());
  CHECK(cat.name() == fmt::format("cat (pid {})", cat.pid()));
  CHECK((::fcntl(cat.receive_fd(), F_GETFD) & FD_CLOEXEC) != 0);
  const std::string model(100000, 'm'); // over a pipe's buffer: written while cat echoes
  const std::array<std::span<const std::byte>, 2> parts{as_bytes("head:"), as_bytes(model)};
  for (int round = 1; round <= 3; ++round) {
    cat.send(FrameType::task, {{"round", round}}, parts);
    const auto f = cat.receive(echo_limits());
    CHECK(f.type == FrameType::task);
    CHECK(f.header["round"] == round);
    CHECK(text_of(f.body) == "head:" + model);
  }
  cat.send(FrameType::eval, nlohmann::json::object());
  CHECK(cat.receive(echo_limits()).type == FrameType::eval);

  // Moved, it is the same child.
  const auto pid = cat.pid();
  WorkerProcess moved(std::move(cat));
  CHECK(moved.pid() == pid);
  moved.send(FrameType::eval, {{"x", 1}});
  CHECK(moved.receive(echo_limits()).header["x"] == 1);
  CHECK_FALSE(moved.exit_description());
}

TEST_CASE("core::WorkerProcess::receive names a child that exited or was killed")
{
  WorkerProcess exits({"/bin/sh", "-c", "exit 3"});
  const auto message = error_of([&] { (void)exits.receive(echo_limits()); });
  CHECK(contains(message, fmt::format("sh -c (pid {}) closed its output", exits.pid())));
  CHECK(contains(message, "exited with status 3"));
  CHECK_FALSE(exits.running());
  CHECK(exits.exit_description() == "exited with status 3");

  WorkerProcess killed({"/bin/sh", "-c", "kill -9 $$"});
  CHECK(contains(error_of([&] { (void)killed.receive(echo_limits()); }), "was killed by signal 9"));

  // A frame cut short by the child's death is its death, not a protocol error.
  WorkerProcess cut({"/bin/sh", "-c", "printf 'FEDL\\001\\003'; exit 4"});
  const auto cut_message = error_of([&] { (void)cut.receive(echo_limits()); });
  CHECK(contains(cut_message, "closed its output inside a frame"));
  CHECK(contains(cut_message, "exited with status 4"));
}

TEST_CASE("core::WorkerProcess: garbage is a ProtocolError naming the child")
{
  WorkerProcess garbage({"/bin/sh", "-c", "echo this is not a fedl frame at all; exec cat >/dev/null"});
  try {
    (void)garbage.receive(echo_limits());
    FAIL("no error");
  } catch (const ProtocolError& e) {
    CHECK(contains(e.what(), fmt::format("sh -c (pid {}): not a fedl frame", garbage.pid())));
  }
  CHECK(garbage.running());
}

TEST_CASE("core::WorkerProcess::kill, sending to a dead child, and the destructor's grace period")
{
  WorkerProcess cat({"/bin/cat"});
  cat.kill();
  CHECK_FALSE(cat.running());
  CHECK(contains(*cat.exit_description(), "killed by signal 9"));
  cat.kill(); // idempotent
  // No SIGPIPE kills the test: the write fails and says why.
  const std::string body(1 << 20, 'x');
  const std::array<std::span<const std::byte>, 1> parts{as_bytes(body)};
  const auto message = error_of([&] { cat.send(FrameType::task, {}, parts); });
  CHECK(contains(message, "stopped reading its input before a task frame"));
  CHECK(contains(message, "killed by signal 9"));

  // A child that ignores the end of its input is killed after the grace period.
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = 0;
  {
    WorkerProcess stubborn({"/bin/sh", "-c", "exec sleep 60"});
    pid = stubborn.pid();
  }
  const auto took = std::chrono::steady_clock::now() - start;
  CHECK(took >= std::chrono::milliseconds(1900));
  CHECK(took < std::chrono::seconds(30));
  CHECK(::kill(pid, 0) != 0); // reaped: no such process any more
}

TEST_CASE("core::WorkerProcess: the child gets only stdin, stdout and stderr")
{
  // A descriptor this process opened without O_CLOEXEC must not reach the child.
  const int leaky = ::open("/dev/null", O_RDONLY);
  REQUIRE(leaky > 2);
  WorkerProcess probe({"/bin/sh", "-c", "exit $(ls /proc/self/fd | wc -l)"});
  (void)error_of([&] { (void)probe.receive(echo_limits()); });
  ::close(leaky);
  // ls's own: 0, 1 (the pipe to wc), 2 and the directory it reads.
  CHECK(probe.exit_description() == "exited with status 4");
}

TEST_CASE("core::WorkerProcess refuses a program that does not exist, and self_executable")
{
  CHECK(contains(error_of([] { WorkerProcess({"/nonexistent/fedl"}); }),
                 "cannot start /nonexistent/fedl: No such file or directory"));
  const auto self = self_executable();
  CHECK(self.is_absolute());
  CHECK(self.filename() == "fedl_unit");
}

TEST_SUITE_END();
