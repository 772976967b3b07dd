// SPDX-License-Identifier: Apache-2.0
// The sandbox's layers, each on its own (sandbox.cpp puts them together in order).
#pragma once

#include "core/sandbox/sandbox.hpp"

#include <filesystem>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

namespace fedl::core::sandbox_detail {

// One path of the mount view: bound from the host at the same path, or a symlink made again.
struct ViewPath
{
  enum class Access
  {
    read,
    write,      // a folder it may create and replace files in, not read them
    read_write, // both: a path named for each
    device,     // a device node it may read and write (and ioctl)
  };
  std::filesystem::path path;
  Access access = Access::read;
  bool directory = false;
  std::optional<std::filesystem::path> symlink_to; // made as this symlink, not bound
};

// The paths a sandboxed process sees: the system's libraries, a few devices, and the policy's
// read and write paths (as given, made absolute, and where symlinks lead). Sorted, each once,
// with paths inside a read-only folder already there left out. Missing paths are left out.
std::vector<ViewPath> view_paths(const SandboxPolicy& policy);

// In a new mount namespace: a private tmpfs at `root` holding `paths`, bound read-only (writable
// for write folders), made the root; the tmpfs is then read-only too. `cwd` is made again (an
// empty folder if nothing was bound there) so that relative paths still resolve. Throws Error.
void enter_mount_view(const std::filesystem::path& root, const std::vector<ViewPath>& paths,
                      const std::filesystem::path& cwd);

// Landlock (Documentation/userspace-api/landlock.rst): handles every access right the kernel's
// ABI knows, grants `paths` theirs. Returns the ABI enforced, or 0 with `why` if there is none.
int apply_landlock(const std::vector<ViewPath>& paths, std::string& why);

// The rights Landlock enforces at `abi`, by name ("read/write/exec files", "refer", "truncate",
// "tcp bind/connect", "device ioctl", "signals and abstract sockets").
std::vector<std::string> landlock_rights(int abi);

// Drops every capability (bounding, ambient, effective, permitted, inheritable) and sets
// no-new-privs. Throws Error.
void drop_privileges();

// The seccomp allow-list (libseccomp); a call outside it fails with EPERM and is logged once per
// system call. Returns false with `why` if it cannot be loaded.
bool apply_seccomp(std::string& why);

// cgroup limits for one child: made before it starts, the child added before it runs anything,
// removed once it has ended.
class Cgroups
{
public:
  // Makes a cgroup under this process's own for each controller `limits` needs (v2 where the
  // host delegates it, else v1) and sets the limits. Empty (and `why`) where it cannot.
  static std::optional<Cgroups> make(const SandboxLimits& limits, std::string& why);
  Cgroups(const Cgroups&) = delete;
  Cgroups& operator=(const Cgroups&) = delete;
  Cgroups(Cgroups&& other) noexcept;
  Cgroups& operator=(Cgroups&&) = delete;
  ~Cgroups();

  // Moves `pid` into every cgroup made. Throws Error.
  void add(pid_t pid) const;
  // Whether a process in them was killed for going past the memory limit.
  bool memory_exceeded() const;
  // "v1", "v2" or "v1+v2".
  const std::string& version() const { return m_version; }
  // In the child: its copy of this object removes nothing.
  void forget() noexcept { m_dirs.clear(); }

  // For each controller (memory, cpu, pids): the version this process may make cgroups of it
  // in ("v2", "v1"), or why not.
  static nlohmann::json support();

private:
  Cgroups() = default;
  std::vector<std::filesystem::path> m_dirs;
  std::optional<std::filesystem::path> m_memory; // the memory cgroup, if any
  bool m_memory_v2 = false;
  std::string m_version;
};

// "512 MiB"
std::string format_bytes(std::uint64_t bytes);

// Writes `text` to a kernel file (/proc, cgroupfs) in one write(2). Throws Error naming the file.
void write_kernel_file(const std::filesystem::path& path, std::string_view text);

// The folders a sandbox makes are named fedl-sandbox-PID[-...] after the process that removes
// them when its child ends; one killed first (SIGKILL) cannot. This removes those in `parent`
// whose process is gone (rmdir: only empty folders and cgroups without a process).
void remove_stale_folders(const std::filesystem::path& parent);

} // namespace fedl::core::sandbox_detail
