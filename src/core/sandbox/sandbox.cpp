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

#if defined(__SANITIZE_ADDRESS__)
namespace {
bool g_sandboxed = false;
} // namespace

// LeakSanitizer's check at exit stops the world with ptrace from a cloned process and reads
// /proc/self/maps, none of which a sandboxed process has: it skips the check (make asan finds
// leaks in the same code run unsandboxed, by the unit tests and the --sandbox off runs).
extern "C" int
__lsan_is_turned_off() // NOLINT(bugprone-reserved-identifier): LeakSanitizer's hook
{
  return g_sandboxed ? 1 : 0;
}
#endif

namespace fedl::core {

using namespace sandbox_detail;

namespace {

// Without cgroups, the memory limit's floor is RLIMIT_DATA this much over it (enter_sandbox);
// not in a sanitizer build, whose shadow memory is reserved by the terabyte.
constexpr std::uint64_t rlimit_data_slack = std::uint64_t{1} << 30;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool rlimit_data_floor = false;
#else
constexpr bool rlimit_data_floor = true;
#endif

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

std::optional<SandboxLevel>
sandbox_level_named(std::string_view text)
{
  for (const auto level : {SandboxLevel::off, SandboxLevel::automatic, SandboxLevel::strict}) {
    if (text == sandbox_level_name(level)) {
      return level;
    }
  }
  return std::nullopt;
}

SandboxLevel
parse_sandbox_level(const std::string& text, const std::string& what)
{
  if (const auto level = sandbox_level_named(text)) {
    return *level;
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
  double scale = 1;
  if (!unit.empty()) {
    const auto power = unit.size() == 1 ? std::string_view("KMGT").find(static_cast<char>(std::toupper(unit[0])))
                                        : std::string_view::npos;
    if (power == std::string_view::npos) {
      used = 0;
    } else {
      scale = std::pow(1024.0, 1 + static_cast<double>(power));
    }
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
  } else if (limits.memory_bytes && rlimit_data_floor) {
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

// Moves each staged output to its place (rename within its folder: all or nothing per file),
// and syncs the folder. False, having said why, if one cannot be.
bool
publish(const SandboxPolicy& policy)
{
  for (const auto& [staged, final_path] : policy.publish) {
    std::error_code ec;
    if (!fs::exists(staged, ec)) {
      continue; // not written (an option not given, a run that wrote nothing)
    }
    fs::rename(staged, final_path, ec);
    if (ec) {
      FEDL_LOG_ERROR("cannot move {} to {}: {}", staged.string(), final_path.string(), ec.message());
      return false;
    }
    sync_folder(final_path.parent_path());
  }
  return true;
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
    if (r == child) {
      break;
    }
    if (r < 0 && errno == ECHILD) {
      status = W_EXITCODE(static_cast<int>(ExitCode::failure), 0); // reaped elsewhere: no status to give
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
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : static_cast<int>(ExitCode::failure);
  if (memory_exceeded) {
    FEDL_LOG_ERROR("{} went past its memory limit of {} and was stopped (raise it with --memory-limit)", policy.name,
                   format_bytes(policy.limits.memory_bytes.value_or(0)));
    code = static_cast<int>(ExitCode::failure);
  } else if (code == 0 && !publish(policy)) {
    code = static_cast<int>(ExitCode::failure);
  }
  for (const auto& dir : policy.staging) {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  if (WIFSIGNALED(status) && !memory_exceeded) {
    // Ends as the child did, without a core dump of this process (which holds what the child
    // must not: fedl train's key, say).
    const int sig = WTERMSIG(status);
    const rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::prctl(PR_SET_DUMPABLE, 0);
    ::signal(sig, SIG_DFL);
    sigset_t one;
    ::sigemptyset(&one);
    ::sigaddset(&one, sig);
    ::sigprocmask(SIG_UNBLOCK, &one, nullptr);
    ::raise(sig);
  }
  ::_exit(code);
}

// enter_sandbox's steps, in order: prepare (paths, cgroups, the new root's mount point), launch
// (clone into the namespaces), then parent() in the parent and confine() in the child.
class Entry
{
public:
  explicit Entry(const SandboxPolicy& policy) : m_policy(policy)
  {
    m_report.level = policy.level;
    m_report.limits = policy.limits;
  }

  void prepare()
  {
    m_paths = view_paths(m_policy);
    std::error_code ec;
    m_cwd = fs::current_path(ec);
    std::string why;
    if (auto made = Cgroups::make(m_policy.limits, why)) {
      m_cgroups.emplace(std::move(*made));
      m_report.cgroup = m_cgroups->version();
    } else {
      lacking("cgroup limits: " + why);
    }
    // The new root's mount point: in the host's view an empty folder, removed at the end.
    remove_stale_folders(fs::temp_directory_path());
    auto root = (fs::temp_directory_path() / fmt::format("fedl-sandbox-{}-XXXXXX", ::getpid())).string();
    if (::mkdtemp(root.data()) == nullptr) {
      throw Error("sandbox: cannot make a folder in {}: {}", fs::temp_directory_path().string(), std::strerror(errno));
    }
    m_root = root;
  }

  // All namespaces; without a user namespace where the host refuses one (a chroot, a sysctl) but
  // this process may make the others itself (root); else none. Returns the pid, as fork() does.
  pid_t launch()
  {
    int go[2] = {-1, -1};
    if (::pipe2(go, O_CLOEXEC) != 0) {
      ::rmdir(m_root.c_str());
      throw Error("sandbox: cannot make a pipe: {}", std::strerror(errno));
    }
    m_go_read.reset(go[0]);
    m_go_write.reset(go[1]);
    // An ignored SIGCHLD (it survives exec) would reap the child before the parent could.
    ::signal(SIGCHLD, SIG_DFL);
    ::sigemptyset(&m_stop_signals);
    for (const int s : {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT}) {
      ::sigaddset(&m_stop_signals, s);
    }
    sigset_t blocked = m_stop_signals;
    ::sigaddset(&blocked, SIGPIPE); // the go pipe's write fails with EPIPE if the child is gone
    ::sigprocmask(SIG_BLOCK, &blocked, &m_old_mask);
    for (const auto& [flag, name] : namespace_flags) {
      m_flags |= flag;
    }
    pid_t pid = clone_with(m_flags);
    if (pid < 0) {
      m_clone_error = std::strerror(errno);
      m_flags &= ~static_cast<unsigned long>(CLONE_NEWUSER);
      pid = clone_with(m_flags);
    }
    if (pid < 0) {
      m_flags = 0;
      pid = clone_with(0);
    }
    if (pid < 0) {
      const int saved = errno;
      ::sigprocmask(SIG_SETMASK, &m_old_mask, nullptr);
      ::rmdir(m_root.c_str());
      throw Error("sandbox: cannot start the sandboxed process: {}", std::strerror(saved));
    }
    return pid;
  }

  // Maps the child's user, puts it in its cgroups, lets it go, and waits for it.
  [[noreturn]] void parent(pid_t child)
  {
    m_go_read.reset();
    char go = '1'; // 'c': its cgroups could not take it
    try {
      if ((m_flags & CLONE_NEWUSER) != 0) {
        const fs::path proc = fmt::format("/proc/{}", child);
        write_kernel_file(proc / "setgroups", "deny");
        write_kernel_file(proc / "uid_map", fmt::format("{0} {0} 1\n", ::geteuid()));
        write_kernel_file(proc / "gid_map", fmt::format("{0} {0} 1\n", ::getegid()));
      }
      if (m_cgroups) {
        try {
          m_cgroups->add(child);
        } catch (const Error& e) {
          if (m_policy.level == SandboxLevel::strict) {
            throw;
          }
          FEDL_LOG_WARN("sandbox: {}", e.what());
          go = 'c'; // the child goes on without them, and says so
        }
      }
    } catch (const Error&) {
      ::kill(child, SIGKILL);
      ::waitpid(child, nullptr, 0);
      ::rmdir(m_root.c_str());
      ::sigprocmask(SIG_SETMASK, &m_old_mask, nullptr);
      throw;
    }
    if (::write(m_go_write.get(), &go, 1) != 1) {
      ::kill(child, SIGKILL);
    }
    m_go_write.reset();
    // The child alone holds the pipes it talks on: their reader sees the end when it ends.
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, STDIN_FILENO);
      ::dup2(null, STDOUT_FILENO);
    }
    ::close_range(STDERR_FILENO + 1, ~0U, 0);
    wait_and_mirror(child, m_stop_signals, m_cgroups, m_policy, m_root);
  }

  // The child: nothing of it runs until the parent has mapped its user and put it in its
  // cgroups; then each layer, the namespaces' first.
  SandboxReport confine()
  {
    ::sigprocmask(SIG_SETMASK, &m_old_mask, nullptr);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    m_go_write.reset();
    char byte = 0;
    ssize_t n = 0;
    while ((n = ::read(m_go_read.get(), &byte, 1)) < 0 && errno == EINTR) {
    }
    if (n != 1) {
      ::_exit(static_cast<int>(ExitCode::failure)); // the parent is gone
    }
    m_go_read.reset();
    if (byte == 'c') {
      m_report.cgroup.clear();
      lacking("cgroup limits: this process could not be put in its cgroups");
    }
    // Nothing it inherited beyond stdin, stdout and stderr (a socket a caller leaked, a folder
    // outside the view).
    ::close_range(STDERR_FILENO + 1, ~0U, 0);
#if defined(__SANITIZE_ADDRESS__)
    g_sandboxed = true;
#endif
    if (m_cgroups) {
      m_cgroups->forget(); // the parent removes them
    }
    for (const auto& [flag, name] : namespace_flags) {
      if ((m_flags & flag) != 0) {
        m_report.namespaces.emplace_back(name);
      } else {
        lacking(fmt::format("{} namespace: {}", name,
                            m_clone_error.empty() ? std::string("not offered") : "clone: " + m_clone_error));
      }
    }
    if ((m_flags & CLONE_NEWUTS) != 0) {
      (void)::sethostname("fedl-sandbox", 12);
    }
    if ((m_flags & CLONE_NEWNS) != 0) {
      try {
        enter_mount_view(m_root, m_paths, m_cwd);
      } catch (const std::exception& e) {
        lacking(fmt::format("mount view: {}", e.what()));
      }
    }
    drop_privileges();
    set_rlimits();
    std::string why;
    m_report.landlock_abi = apply_landlock(m_paths, why);
    if (m_report.landlock_abi == 0) {
      lacking(why);
    }
    m_report.seccomp = apply_seccomp(why);
    if (!m_report.seccomp) {
      lacking(why);
    }
    return m_report;
  }

private:
  void lacking(const std::string& why)
  {
    if (m_policy.level == SandboxLevel::strict) {
      throw Error("--sandbox strict: {}; fix the host, or run with --sandbox auto to go on without it", why);
    }
    m_report.missing.push_back(why);
  }

  void set_rlimits() const
  {
    const rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    if (rlimit_data_floor && !m_cgroups && m_policy.limits.memory_bytes) {
      // The floor: private writable memory (RLIMIT_DATA). It counts what is reserved, not what
      // is used, and OpenBLAS reserves 128 MiB per thread and spins for ever when that fails:
      // hence 1 GiB over the limit.
      const auto bytes = *m_policy.limits.memory_bytes + rlimit_data_slack;
      const rlimit data{bytes, bytes};
      ::setrlimit(RLIMIT_DATA, &data);
    }
  }

  const SandboxPolicy& m_policy;
  SandboxReport m_report;
  std::vector<ViewPath> m_paths;
  fs::path m_cwd;
  std::optional<Cgroups> m_cgroups;
  fs::path m_root;
  UniqueFd m_go_read;
  UniqueFd m_go_write;
  sigset_t m_stop_signals{};
  sigset_t m_old_mask{};
  unsigned long m_flags = 0;
  std::string m_clone_error;
};

} // namespace

SandboxReport
enter_sandbox(const SandboxPolicy& policy)
{
  if (policy.level == SandboxLevel::off) {
    SandboxReport report;
    report.limits = policy.limits;
    return report;
  }
  Entry entry(policy);
  entry.prepare();
  const pid_t pid = entry.launch();
  if (pid > 0) {
    entry.parent(pid);
  }
  return entry.confine();
}

nlohmann::json
sandbox_host_support()
{
  nlohmann::json out;
  // A user namespace, tried for real: a throwaway child made as the sandbox makes its own.
  const pid_t pid = clone_with(CLONE_NEWUSER);
  if (pid == 0) {
    ::_exit(0);
  }
  const int clone_errno = errno;
  if (pid > 0) {
    ::waitpid(pid, nullptr, 0);
  }
  out["user_namespaces"] = {{"supported", pid > 0}};
  if (pid < 0) {
    out["user_namespaces"]["why"] = std::strerror(clone_errno);
  }
  constexpr unsigned version_flag = 1U;
  const long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, version_flag);
  out["landlock_abi"] = abi > 0 ? abi : 0;
  out["seccomp"] = ::prctl(PR_GET_SECCOMP) >= 0 && ::seccomp_api_get() >= 1;
  out["cgroup"] = Cgroups::support();
  return out;
}

} // namespace fedl::core
