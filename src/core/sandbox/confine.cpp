// SPDX-License-Identifier: Apache-2.0
// The sandbox's in-process layers: Landlock, capabilities and no-new-privs, seccomp.
#include "core/sandbox/sandbox_detail.hpp"

#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>
#include <seccomp.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <unistd.h>

namespace fedl::core::sandbox_detail {

namespace {

// Landlock's user-space ABI (include/uapi/linux/landlock.h, Documentation/userspace-api/
// landlock.rst), spelled out here: Debian 12's headers (Linux 6.1) know only ABI 2, and the
// kernel this runs on may know more. Each right is handled only where the ABI has it.
struct LandlockRulesetAttr
{
  std::uint64_t handled_access_fs;
  std::uint64_t handled_access_net; // ABI 4
  std::uint64_t scoped;             // ABI 6
};
struct __attribute__((packed)) LandlockPathBeneathAttr
{
  std::uint64_t allowed_access;
  std::int32_t parent_fd;
};
constexpr unsigned landlock_create_ruleset_version = 1U << 0;
constexpr int landlock_rule_path_beneath = 1;
constexpr std::uint64_t fs_execute = 1ULL << 0;
constexpr std::uint64_t fs_write_file = 1ULL << 1;
constexpr std::uint64_t fs_read_file = 1ULL << 2;
constexpr std::uint64_t fs_read_dir = 1ULL << 3;
constexpr std::uint64_t fs_remove_file = 1ULL << 5;
constexpr std::uint64_t fs_make_reg = 1ULL << 8;
constexpr std::uint64_t fs_abi1 = (1ULL << 13) - 1; // execute .. make_sym
constexpr std::uint64_t fs_refer = 1ULL << 13;      // ABI 2
constexpr std::uint64_t fs_truncate = 1ULL << 14;   // ABI 3
constexpr std::uint64_t fs_ioctl_dev = 1ULL << 15;  // ABI 5
constexpr std::uint64_t file_rights = fs_execute | fs_write_file | fs_read_file | fs_truncate | fs_ioctl_dev;
constexpr std::uint64_t net_bind_tcp = 1ULL << 0;        // ABI 4
constexpr std::uint64_t net_connect_tcp = 1ULL << 1;     // ABI 4
constexpr std::uint64_t scope_abstract_unix = 1ULL << 0; // ABI 6
constexpr std::uint64_t scope_signal = 1ULL << 1;        // ABI 6

#ifndef SYS_landlock_create_ruleset
constexpr long SYS_landlock_create_ruleset = 444;
constexpr long SYS_landlock_add_rule = 445;
constexpr long SYS_landlock_restrict_self = 446;
#endif

} // namespace

int
apply_landlock(const std::vector<ViewPath>& paths, std::string& why)
{
  const long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, landlock_create_ruleset_version);
  if (abi < 1) {
    why = fmt::format("Landlock: not offered by this kernel ({})", std::strerror(errno));
    return 0;
  }
  LandlockRulesetAttr attr{fs_abi1, 0, 0};
  std::size_t size = sizeof(std::uint64_t);
  if (abi >= 2) {
    attr.handled_access_fs |= fs_refer;
  }
  if (abi >= 3) {
    attr.handled_access_fs |= fs_truncate;
  }
  if (abi >= 4) {
    attr.handled_access_net = net_bind_tcp | net_connect_tcp;
    size = 2 * sizeof(std::uint64_t);
  }
  if (abi >= 5) {
    attr.handled_access_fs |= fs_ioctl_dev;
  }
  if (abi >= 6) {
    attr.scoped = scope_abstract_unix | scope_signal;
    size = sizeof(attr);
  }
  const int ruleset = static_cast<int>(::syscall(SYS_landlock_create_ruleset, &attr, size, 0));
  if (ruleset < 0) {
    why = fmt::format("Landlock: cannot create a ruleset ({})", std::strerror(errno));
    return 0;
  }
  const std::uint64_t read = fs_read_file | fs_read_dir;
  for (const auto& v : paths) {
    if (v.symlink_to) {
      continue;
    }
    std::uint64_t allowed = read;
    const std::uint64_t write = fs_read_dir | fs_write_file | fs_make_reg | fs_remove_file | fs_truncate;
    if (v.access == ViewPath::Access::write) {
      // Make and replace files, not read them: a write folder may hold what it must not see.
      allowed = write;
    } else if (v.access == ViewPath::Access::read_write) {
      allowed |= write;
    } else if (v.access == ViewPath::Access::device) {
      allowed |= fs_write_file | fs_ioctl_dev;
    }
    if (!v.directory) {
      allowed &= file_rights;
    }
    LandlockPathBeneathAttr rule{allowed & attr.handled_access_fs, ::open(v.path.c_str(), O_PATH | O_CLOEXEC)};
    if (rule.parent_fd < 0) {
      continue; // not there: nothing to grant
    }
    const long rc = ::syscall(SYS_landlock_add_rule, ruleset, landlock_rule_path_beneath, &rule, 0);
    const int saved = errno;
    ::close(rule.parent_fd);
    if (rc != 0) {
      ::close(ruleset);
      why = fmt::format("Landlock: cannot add a rule for {} ({})", v.path.string(), std::strerror(saved));
      return 0;
    }
  }
  const long rc = ::syscall(SYS_landlock_restrict_self, ruleset, 0);
  const int saved = errno;
  ::close(ruleset);
  if (rc != 0) {
    why = fmt::format("Landlock: cannot restrict this process ({})", std::strerror(saved));
    return 0;
  }
  return static_cast<int>(abi);
}

std::vector<std::string>
landlock_rights(int abi)
{
  std::vector<std::string> out;
  const std::pair<int, const char*> by_abi[] = {{1, "files"}, {2, "refer"},        {3, "truncate"},
                                                {4, "tcp"},   {5, "device ioctl"}, {6, "scopes"}};
  for (const auto& [since, name] : by_abi) {
    if (abi >= since) {
      out.emplace_back(name);
    }
  }
  return out;
}

void
drop_privileges()
{
  for (int cap = 0; cap <= 63; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno == EINVAL) {
      break; // past the last capability this kernel knows
    }
  }
  (void)::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  std::array<__user_cap_data_struct, 2> none{};
  if (::syscall(SYS_capset, &header, none.data()) != 0) {
    throw Error("sandbox: cannot drop capabilities: {}", std::strerror(errno));
  }
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    throw Error("sandbox: cannot set no-new-privs: {}", std::strerror(errno));
  }
}

namespace {

// What a trainer does: files it was let see, memory, threads, time, signals to itself. Nothing
// that reaches another process, the network, the kernel's configuration, or starts a program.
const char* const allowed_calls[] = {
  // files (what a path reaches is the mount view's and Landlock's business)
  "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "lseek",
  "close", "close_range", "fstat", "stat", "lstat", "newfstatat", "statx", "fstatfs", "statfs", "access", "faccessat",
  "faccessat2", "readlink", "readlinkat", "getcwd", "chdir", "fchdir", "getdents64", "open", "openat", "fcntl", "dup",
  "dup2", "dup3", "flock", "fadvise64", "ftruncate", "fsync", "fdatasync", "rename", "renameat", "renameat2", "unlink",
  "unlinkat", "mkdir", "mkdirat", "umask", "pipe2", "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl",
  "epoll_wait", "epoll_pwait", "eventfd2",
  // memory
  "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "msync", "mincore", "mlock", "munlock", "mbind",
  "set_mempolicy", "get_mempolicy", "membarrier",
  // threads, time, identity, limits, signals
  "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "gettid", "sched_yield",
  "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
  "sched_get_priority_min", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
  "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "getpgrp",
  "uname", "sysinfo", "getrlimit", "setrlimit", "getrusage", "times", "getrandom", "arch_prctl", "prctl", "sigaltstack",
  "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait", "restart_syscall", "exit",
  "exit_group"};

std::array<std::string, 1024> g_denied_lines; // the log line for each system call number
std::array<std::atomic<bool>, 1024> g_denied_seen{};

// SIGSYS from SECCOMP_RET_TRAP: the call did not run; it returns -EPERM, logged once per call.
void
on_denied(int, siginfo_t* info, void* context)
{
  const int nr = info->si_syscall;
  if (nr >= 0 && static_cast<std::size_t>(nr) < g_denied_lines.size() && !g_denied_seen[nr].exchange(true)) {
    const auto& line = g_denied_lines[nr];
    (void)!::write(STDERR_FILENO, line.data(), line.size());
  }
  auto* uc = static_cast<ucontext_t*>(context);
#if defined(__x86_64__)
  uc->uc_mcontext.gregs[REG_RAX] = -EPERM;
#elif defined(__aarch64__)
  uc->uc_mcontext.regs[0] = static_cast<unsigned long long>(-EPERM);
#else
  (void)uc;
#endif
}

} // namespace

bool
apply_seccomp(std::string& why)
{
#if defined(__x86_64__) || defined(__aarch64__)
  const auto default_action = SCMP_ACT_TRAP; // on_denied makes it EPERM and logs it
#else
  const auto default_action = SCMP_ACT_ERRNO(EPERM);
#endif
  scmp_filter_ctx ctx = ::seccomp_init(default_action);
  if (ctx == nullptr) {
    why = "seccomp: cannot make a filter";
    return false;
  }
  int rc = 0;
  for (const char* name : allowed_calls) {
    const int nr = ::seccomp_syscall_resolve_name(name);
    if (nr != __NR_SCMP_ERROR && rc == 0) {
      rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
    }
  }
  // Threads, not processes: clone only with CLONE_THREAD. clone3 passes its flags in memory that a
  // filter cannot read; ENOSYS makes the C library use clone.
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(clone), 1,
                            SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
  }
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
  }
  // ioctl, but no terminal ones (0x54xx): TIOCSTI would type into the operator's terminal, which
  // stderr may be. They fail with ENOTTY, as on a file that is no terminal (isatty() says no).
  // Compared on 32 bits, as the kernel reads the request.
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1_32(SCMP_CMP_LT, 0x5400));
  }
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1_32(SCMP_CMP_GT, 0x54FF));
  }
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOTTY), SCMP_SYS(ioctl), 1,
                            SCMP_A1_32(SCMP_CMP_MASKED_EQ, 0xFF00, 0x5400));
  }
  // fcntl, but not F_SETOWN, F_SETSIG, F_SETLEASE or F_NOTIFY, which make the kernel signal a
  // process of its choosing.
  for (const int cmd : {F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_SETLK, F_SETLKW,
                        F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_GETPIPE_SZ, F_SETPIPE_SZ, F_ADD_SEALS, F_GET_SEALS}) {
    if (rc == 0) {
      rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(fcntl), 1,
                              SCMP_A1_32(SCMP_CMP_EQ, static_cast<scmp_datum_t>(cmd)));
    }
  }
  // Unix sockets fail too, without a log line: glibc's NSS tries nscd's through one whenever a
  // library looks a user up (glog does, as LibTorch loads).
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX));
  }
  // Signals to itself only (abort, raise); prlimit64 on itself only (getrlimit is prlimit64(0)).
  const auto self = static_cast<scmp_datum_t>(::getpid());
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_EQ, self));
  }
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(kill), 1, SCMP_A0(SCMP_CMP_EQ, self));
  }
  if (rc == 0) {
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(prlimit64), 1, SCMP_A0(SCMP_CMP_EQ, 0));
  }
  if (rc != 0) {
    ::seccomp_release(ctx);
    why = fmt::format("seccomp: cannot add a rule ({})", std::strerror(-rc));
    return false;
  }
  for (std::size_t nr = 0; nr < g_denied_lines.size(); ++nr) {
    char* name = ::seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, static_cast<int>(nr));
    g_denied_lines[nr] = log::line_without_time(
      log::Level::warning,
      fmt::format("sandbox: denied system call {} ({}): it failed with EPERM", name != nullptr ? name : "?", nr));
    std::free(name); // NOLINT(cppcoreguidelines-no-malloc): libseccomp's allocation
  }
  struct sigaction sa
  {};
  sa.sa_sigaction = on_denied;
  sa.sa_flags = SA_SIGINFO;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSYS, &sa, nullptr);
  sigset_t sys;
  ::sigemptyset(&sys);
  ::sigaddset(&sys, SIGSYS);
  ::sigprocmask(SIG_UNBLOCK, &sys, nullptr);
  rc = ::seccomp_load(ctx);
  ::seccomp_release(ctx);
  if (rc != 0) {
    why = fmt::format("seccomp: cannot load the filter ({})", std::strerror(-rc));
    return false;
  }
  return true;
}

} // namespace fedl::core::sandbox_detail
