// SPDX-License-Identifier: Apache-2.0
#include "core/sandbox/sandbox.hpp"

#include "core/sandbox/sandbox_detail.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <seccomp.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core {

using namespace sandbox_detail;

namespace {

// Without cgroups, the memory limit's floor is RLIMIT_DATA this much over it (enter_sandbox).
constexpr std::uint64_t rlimit_data_slack = std::uint64_t{1} << 30;

} // namespace

std::string
sandbox_level_name(SandboxLevel level)
{
  switch (level) {
  case SandboxLevel::off:
    return "off";
  case SandboxLevel::automatic:
    return "auto";
  case SandboxLevel::strict:
    return "strict";
  }
  return "auto";
}

SandboxLevel
parse_sandbox_level(const std::string& text, const std::string& what)
{
  for (const auto level : {SandboxLevel::off, SandboxLevel::automatic, SandboxLevel::strict}) {
    if (text == sandbox_level_name(level)) {
      return level;
    }
  }
  throw UsageError("{}: {} is not a sandbox level: give strict, auto or off", what, text);
}

std::uint64_t
parse_memory_size(const std::string& text, const std::string& what)
{
  std::size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  auto unit = text.substr(used);
  if (!unit.empty() && (unit.back() == 'B' || unit.back() == 'b')) {
    unit.pop_back();
  }
  if (!unit.empty() && unit.back() == 'i') {
    unit.pop_back();
  }
  const std::string units = "KMGT";
  double scale = 1;
  if (unit.size() == 1 && units.find(static_cast<char>(std::toupper(unit[0]))) != std::string::npos) {
    scale = std::pow(1024.0, 1 + static_cast<double>(units.find(static_cast<char>(std::toupper(unit[0])))));
  } else if (!unit.empty()) {
    used = 0;
  }
  const double bytes = value * scale;
  if (used == 0 || !std::isfinite(bytes) || bytes < 16.0 * 1024 * 1024 || bytes > 1e18) {
    throw UsageError("{} {}: give a size of at least 16M, such as 512M or 2G (K, M, G and T are powers of 1024)", what,
                     text);
  }
  return static_cast<std::uint64_t>(bytes);
}

nlohmann::json
SandboxReport::to_json() const
{
  nlohmann::json limits_json = nlohmann::json::object();
  if (limits.memory_bytes) {
    limits_json["memory_bytes"] = *limits.memory_bytes;
  }
  if (limits.cpus) {
    limits_json["cpus"] = *limits.cpus;
  }
  if (limits.pids) {
    limits_json["pids"] = *limits.pids;
  }
  return {{"level", sandbox_level_name(level)},
          {"namespaces", namespaces},
          {"landlock_abi", landlock_abi},
          {"landlock_rights", landlock_rights(landlock_abi)},
          {"seccomp", seccomp},
          {"cgroup", cgroup.empty() ? nlohmann::json(nullptr) : nlohmann::json(cgroup)},
          {"limits", limits_json},
          {"missing", missing}};
}

std::string
SandboxReport::summary() const
{
  if (level == SandboxLevel::off) {
    return "sandbox off";
  }
  std::vector<std::string> parts;
  parts.push_back(namespaces.empty() ? "no namespaces" : fmt::format("namespaces {}", fmt::join(namespaces, ",")));
  parts.push_back(landlock_abi > 0
                    ? fmt::format("Landlock ABI {} ({})", landlock_abi, fmt::join(landlock_rights(landlock_abi), ", "))
                    : "no Landlock");
  parts.emplace_back(seccomp ? "seccomp" : "no seccomp");
  std::vector<std::string> l;
  if (limits.memory_bytes) {
    l.push_back("memory " + format_bytes(*limits.memory_bytes));
  }
  if (limits.cpus) {
    l.push_back(fmt::format("cpu {:g}", *limits.cpus));
  }
  if (limits.pids) {
    l.push_back(fmt::format("pids {}", *limits.pids));
  }
  if (!cgroup.empty()) {
    parts.push_back(fmt::format("cgroup {} ({})", cgroup, fmt::join(l, ", ")));
  } else if (limits.memory_bytes) {
    parts.push_back("rlimit data " + format_bytes(*limits.memory_bytes + rlimit_data_slack));
  }
  auto text = fmt::format("sandbox {}: {}", sandbox_level_name(level), fmt::join(parts, "; "));
  if (!missing.empty()) {
    text += fmt::format(" (not enforced: {})", fmt::join(missing, "; "));
  }
  return text;
}

namespace {

constexpr std::pair<unsigned long, const char*> namespace_flags[] = {{CLONE_NEWUSER, "user"}, {CLONE_NEWNS, "mount"},
                                                                     {CLONE_NEWNET, "net"},   {CLONE_NEWPID, "pid"},
                                                                     {CLONE_NEWIPC, "ipc"},   {CLONE_NEWUTS, "uts"}};

// fork(2) with namespaces: the raw system call, as fork() cannot take flags. The caller is
// single-threaded, so no lock of the C library is held across it.
pid_t
clone_with(unsigned long flags)
{
  return static_cast<pid_t>(::syscall(SYS_clone, flags | SIGCHLD, nullptr, nullptr, nullptr, nullptr));
}

void
write_proc(pid_t pid, const char* file, const std::string& text)
{
  const auto path = fmt::format("/proc/{}/{}", pid, file);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  const bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  const int saved = errno;
  if (fd >= 0) {
    ::close(fd);
  }
  if (!ok) {
    throw Error("sandbox: cannot write {}: {}", path, std::strerror(saved));
  }
}

// The parent's part: waits for the child, passes on the signals that ask it to stop (SIGKILL
// after 5 s if it does not: as its PID namespace's init it ignores those it has no handler for),
// and ends as it did.
[[noreturn]] void
wait_and_mirror(pid_t child, const sigset_t& stop_signals, std::optional<Cgroups>& cgroups, const SandboxPolicy& policy,
                const fs::path& root)
{
  int status = 0;
  std::optional<std::chrono::steady_clock::time_point> kill_at;
  for (;;) {
    const pid_t r = ::waitpid(child, &status, WNOHANG);
    if (r == child || (r < 0 && errno == ECHILD)) {
      break;
    }
    const timespec tick{0, 200'000'000};
    const int sig = ::sigtimedwait(&stop_signals, nullptr, &tick);
    if (sig > 0 && sig != SIGCHLD) {
      ::kill(child, sig);
      kill_at = kill_at.value_or(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    }
    if (kill_at && std::chrono::steady_clock::now() > *kill_at) {
      ::kill(child, SIGKILL);
    }
  }
  (void)::rmdir(root.c_str());
  const bool memory_exceeded = cgroups && cgroups->memory_exceeded();
  cgroups.reset(); // _exit runs no destructor
  if (memory_exceeded) {
    FEDL_LOG_ERROR("{} went past its memory limit of {} and was stopped (raise it with --memory-limit)", policy.name,
                   format_bytes(policy.limits.memory_bytes.value_or(0)));
    ::_exit(static_cast<int>(ExitCode::failure));
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    ::signal(sig, SIG_DFL);
    sigset_t one;
    ::sigemptyset(&one);
    ::sigaddset(&one, sig);
    ::sigprocmask(SIG_UNBLOCK, &one, nullptr);
    ::raise(sig);
  }
  ::_exit(WIFEXITED(status) ? WEXITSTATUS(status) : static_cast<int>(ExitCode::failure));
}

} // namespace

SandboxReport
enter_sandbox(const SandboxPolicy& policy)
{
  SandboxReport report;
  report.level = policy.level;
  report.limits = policy.limits;
  if (policy.level == SandboxLevel::off) {
    return report;
  }
  const auto lacking = [&](const std::string& why) {
    if (policy.level == SandboxLevel::strict) {
      throw Error("--sandbox strict: {}; fix the host, or run with --sandbox auto to go on without it", why);
    }
    report.missing.push_back(why);
  };

  const auto paths = view_paths(policy);
  std::error_code ec;
  const auto cwd = fs::current_path(ec);
  std::string why;
  auto cgroups = Cgroups::make(policy.limits, why);
  if (cgroups) {
    report.cgroup = cgroups->version();
  } else {
    lacking("cgroup limits: " + why);
  }
  // The new root's mount point, in the host's view an empty folder removed at the end.
  remove_stale_folders(fs::temp_directory_path());
  auto root_template = (fs::temp_directory_path() / fmt::format("fedl-sandbox-{}-XXXXXX", ::getpid())).string();
  if (::mkdtemp(root_template.data()) == nullptr) {
    throw Error("sandbox: cannot make a folder in {}: {}", fs::temp_directory_path().string(), std::strerror(errno));
  }
  const fs::path root = root_template;

  int go[2] = {-1, -1};
  if (::pipe2(go, O_CLOEXEC) != 0) {
    ::rmdir(root.c_str());
    throw Error("sandbox: cannot make a pipe: {}", std::strerror(errno));
  }
  sigset_t stop_signals;
  ::sigemptyset(&stop_signals);
  for (const int s : {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT}) {
    ::sigaddset(&stop_signals, s);
  }
  sigset_t old_mask;
  ::sigprocmask(SIG_BLOCK, &stop_signals, &old_mask);

  // All namespaces; without a user namespace where the host refuses one (a chroot, a sysctl) but
  // this process may make the others itself (root); else none.
  unsigned long flags = 0;
  for (const auto& [flag, name] : namespace_flags) {
    flags |= flag;
  }
  pid_t pid = clone_with(flags);
  std::string clone_error;
  if (pid < 0) {
    clone_error = std::strerror(errno);
    flags &= ~static_cast<unsigned long>(CLONE_NEWUSER);
    pid = clone_with(flags);
  }
  if (pid < 0) {
    flags = 0;
    pid = clone_with(0);
  }
  if (pid < 0) {
    const int saved = errno;
    ::sigprocmask(SIG_SETMASK, &old_mask, nullptr);
    ::rmdir(root.c_str());
    throw Error("sandbox: cannot start the sandboxed process: {}", std::strerror(saved));
  }

  if (pid > 0) {
    ::close(go[0]);
    try {
      if ((flags & CLONE_NEWUSER) != 0) {
        write_proc(pid, "setgroups", "deny");
        write_proc(pid, "uid_map", fmt::format("{0} {0} 1\n", ::geteuid()));
        write_proc(pid, "gid_map", fmt::format("{0} {0} 1\n", ::getegid()));
      }
      if (cgroups) {
        cgroups->add(pid);
      }
    } catch (const Error& e) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      ::rmdir(root.c_str());
      throw;
    }
    if (::write(go[1], "1", 1) != 1) {
      ::kill(pid, SIGKILL);
    }
    ::close(go[1]);
    // The child alone holds the pipes it talks on: their reader sees the end when it ends.
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, STDIN_FILENO);
      ::dup2(null, STDOUT_FILENO);
    }
    ::close_range(STDERR_FILENO + 1, ~0U, 0);
    wait_and_mirror(pid, stop_signals, cgroups, policy, root);
  }

  // The child: nothing of it runs until the parent has mapped its user and put it in its cgroups.
  ::sigprocmask(SIG_SETMASK, &old_mask, nullptr);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  ::close(go[1]);
  char byte = 0;
  if (::read(go[0], &byte, 1) != 1) {
    ::_exit(static_cast<int>(ExitCode::failure)); // the parent is gone
  }
  ::close(go[0]);
  if (cgroups) {
    cgroups->forget(); // the parent removes them
  }
  for (const auto& [flag, name] : namespace_flags) {
    if ((flags & flag) != 0) {
      report.namespaces.emplace_back(name);
    } else {
      lacking(fmt::format("{} namespace: {}", name,
                          clone_error.empty() ? std::string("not offered") : "clone: " + clone_error));
    }
  }
  if ((flags & CLONE_NEWUTS) != 0) {
    (void)::sethostname("fedl-sandbox", 12);
  }
  if ((flags & CLONE_NEWNS) != 0) {
    try {
      enter_mount_view(root, paths, cwd);
    } catch (const std::exception& e) {
      lacking(fmt::format("mount view: {}", e.what()));
    }
  }
  drop_privileges();
  const rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);
  if (!cgroups && policy.limits.memory_bytes) {
    // The floor: private writable memory (RLIMIT_DATA). It counts what is reserved, not what is
    // used, and OpenBLAS reserves 128 MiB per thread and spins for ever when that fails: hence 1
    // GiB over the limit.
    const rlimit data{*policy.limits.memory_bytes + rlimit_data_slack, *policy.limits.memory_bytes + rlimit_data_slack};
    ::setrlimit(RLIMIT_DATA, &data);
  }
  report.landlock_abi = apply_landlock(paths, why);
  if (report.landlock_abi == 0) {
    lacking(why);
  }
  report.seccomp = apply_seccomp(why);
  if (!report.seccomp) {
    lacking(why);
  }
  return report;
}

nlohmann::json
sandbox_host_support()
{
  nlohmann::json out;
  // A user namespace, tried for real in a throwaway child.
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::_exit(::unshare(CLONE_NEWUSER) == 0 ? 0 : errno);
  }
  int status = 0;
  if (pid > 0) {
    ::waitpid(pid, &status, 0);
  }
  const bool userns = pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  out["user_namespaces"] = {{"supported", userns}};
  if (!userns) {
    out["user_namespaces"]["why"] = pid > 0 && WIFEXITED(status) ? std::strerror(WEXITSTATUS(status)) : "cannot fork";
  }
  constexpr unsigned version_flag = 1U;
  const long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, version_flag);
  out["landlock_abi"] = abi > 0 ? abi : 0;
  out["seccomp"] = ::prctl(PR_GET_SECCOMP) >= 0 && ::seccomp_api_get() >= 1;
  out["cgroup"] = Cgroups::support();
  return out;
}

} // namespace fedl::core
