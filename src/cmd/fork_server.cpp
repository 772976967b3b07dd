// SPDX-License-Identifier: Apache-2.0
// fedl __fork-server SOCKET (hidden): the fork server of `fedl join --fork-server` (core/net/
// fork_server.hpp). It loads the compute backends once, then forks a trainer (`fedl __worker`,
// run as fedl's own command line in the fork) for each site that asks, until it has been idle.
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "core/net/fork_server.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fedl::cmd {

namespace {

struct ForkServerOptions
{
  std::filesystem::path socket;
  double idle = 30;
  bool detach = false;
  bool preload = true;
};

// With --detach: the server goes on in a child of its own session, and this process returns
// once the child listens (0), has found another server holding the socket (0), or has failed
// (its status). Returns -1 in the child.
int
detach(core::UniqueFd& ready)
{
  int fds[2] = {-1, -1};
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    throw core::Error("cannot start the fork server: {}", std::strerror(errno));
  }
  core::UniqueFd read_end(fds[0]);
  core::UniqueFd write_end(fds[1]);
  const pid_t pid = ::fork();
  if (pid < 0) {
    throw core::Error("cannot start the fork server: {}", std::strerror(errno));
  }
  if (pid == 0) {
    ready = std::move(write_end);
    ::setsid();
    return -1;
  }
  write_end.reset();
  char c = 0;
  ssize_t n = 0;
  while ((n = ::read(read_end.get(), &c, 1)) < 0 && errno == EINTR) {
  }
  if (n == 1) {
    return 0; // listening
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int
run_fork_server(const ForkServerOptions& opt)
{
  core::UniqueFd ready;
  if (opt.detach) {
    if (const int rc = detach(ready); rc >= 0) {
      return rc;
    }
  }
  const auto prepare = [&opt] {
    if (opt.preload) {
      const auto& loaded = backends::all_backends();
      FEDL_LOG_DEBUG("fork server: {} backend(s) loaded", loaded.size());
    }
  };
  const auto child = [](const std::vector<std::string>& argv) {
    mark_process_start();
    // Its command line stays the server's (there is no exec); ps and top show this name.
    ::prctl(PR_SET_NAME, "fedl-worker");
    std::vector<char*> args;
    for (const auto& a : argv) {
      args.push_back(const_cast<char*>(a.c_str()));
    }
    args.push_back(nullptr);
    return run_fedl(static_cast<int>(argv.size()), args.data());
  };
  const auto listening = [&ready] {
    if (ready) {
      (void)::write(ready.get(), "1", 1);
      ready.reset();
    }
  };
  return core::run_fork_server(opt.socket, opt.idle, prepare, child, listening);
}

} // namespace

Command
add_fork_server(CLI::App& parent)
{
  auto opt = std::make_shared<ForkServerOptions>();
  auto* app = parent.add_subcommand("__fork-server", "Fork trainers for fedl join --fork-server (started by join)");
  app->group(""); // hidden: started by fedl join
  app->add_option("socket", opt->socket, "The Unix socket to listen on")->required()->type_name("SOCKET");
  app->add_option("--idle", opt->idle, "Exit after this long without a site or a trainer")
    ->capture_default_str()
    ->check(CLI::PositiveNumber)
    ->type_name("SEC");
  app->add_flag("!--no-preload", opt->preload,
                "Load no backend before forking (each trainer loads them inside its sandbox)");
  app->add_flag("--detach", opt->detach, "Go on in the background; return once listening, or with the failure");
  return {app, [opt] { return run_fork_server(*opt); }};
}

} // namespace fedl::cmd
