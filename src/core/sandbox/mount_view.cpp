// SPDX-License-Identifier: Apache-2.0
// The sandbox's mount view (mount_namespaces(7), pivot_root(2)) and the paths in it.
#include "core/sandbox/sandbox_detail.hpp"

#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core::sandbox_detail {

namespace {

// What the dynamic loader and the compute libraries read: libraries (and the top-level symlinks
// of a merged /usr), the loader's cache, Debian's alternatives (libblas.so.3 is one), and the
// CPU topology and description that OpenMP and LibTorch size their thread pools by (cpuinfo,
// LibTorch's, refuses to start without /proc/cpuinfo).
const char* const system_paths[] = {"/usr",
                                    "/lib",
                                    "/lib64",
                                    "/lib32",
                                    "/libx32",
                                    "/bin",
                                    "/sbin",
                                    "/etc/ld.so.cache",
                                    "/etc/alternatives",
                                    "/sys/devices/system/cpu",
                                    "/proc/cpuinfo"};
const char* const devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};

// Folders named by /etc/ld.so.conf.d/*.conf (CUDA and vendor libraries are often found there) and
// by LD_LIBRARY_PATH.
std::vector<fs::path>
library_folders()
{
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it("/etc/ld.so.conf.d", ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().extension() != ".conf") {
      continue;
    }
    std::ifstream in(it->path());
    std::string line;
    while (std::getline(in, line)) {
      line.erase(0, line.find_first_not_of(" \t"));
      line.erase(line.find_last_not_of(" \t\r") + 1);
      if (!line.empty() && line[0] == '/') {
        out.emplace_back(line);
      }
    }
  }
  if (const char* env = std::getenv("LD_LIBRARY_PATH"); env != nullptr) {
    for (const auto& item : split_text(env, ":")) {
      if (item[0] == '/') {
        out.emplace_back(item);
      }
    }
  }
  return out;
}

bool
inside(const fs::path& path, const fs::path& folder)
{
  auto p = path.begin();
  for (auto f = folder.begin(); f != folder.end(); ++f, ++p) {
    if (p == path.end() || *p != *f) {
      return false;
    }
  }
  return true;
}

// Binds where `given` really is; a symlink on the way to it is made again, so that the path as
// given resolves too (the first one only: what lies past it is bound at its real place).
void
add(std::vector<ViewPath>& out, const fs::path& given, ViewPath::Access access)
{
  std::error_code ec;
  const auto path = fs::absolute(given, ec).lexically_normal();
  const auto real = ec ? fs::path() : fs::canonical(path, ec);
  if (ec) {
    return; // not there: nothing to see
  }
  fs::path prefix = path.root_path();
  for (auto part = std::next(path.begin()); part != path.end(); ++part) {
    prefix /= *part;
    if (fs::is_symlink(prefix, ec)) {
      if (auto target = fs::read_symlink(prefix, ec); !ec) {
        out.push_back({prefix, access, false, std::move(target)});
      }
      break;
    }
  }
  out.push_back({real, access, fs::is_directory(real, ec), std::nullopt});
}

// A sanitizer build (make asan, make tsan) writes its reports to the folder of log_path in
// ASAN_OPTIONS, TSAN_OPTIONS or UBSAN_OPTIONS: a sandboxed process may write there too.
std::vector<fs::path>
sanitizer_log_folders()
{
  std::vector<fs::path> out;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  for (const char* name : {"ASAN_OPTIONS", "TSAN_OPTIONS", "UBSAN_OPTIONS"}) {
    const char* options = std::getenv(name);
    const std::string_view text = options != nullptr ? options : "";
    const auto at = text.find("log_path=");
    if (at != std::string_view::npos) {
      const auto value = text.substr(at + 9, text.find(':', at) - at - 9);
      out.push_back(fs::path(value).parent_path());
    }
  }
#endif
  return out;
}

} // namespace

std::vector<ViewPath>
view_paths(const SandboxPolicy& policy)
{
  std::vector<ViewPath> all;
  for (const char* p : system_paths) {
    add(all, p, ViewPath::Access::read);
  }
  for (const auto& p : library_folders()) {
    add(all, p, ViewPath::Access::read);
  }
  for (const auto& p : policy.read) {
    add(all, p, ViewPath::Access::read);
  }
  for (const auto& p : policy.write) {
    add(all, p, ViewPath::Access::write);
  }
  for (const auto& p : sanitizer_log_folders()) {
    add(all, p, ViewPath::Access::write);
  }
  for (const char* p : devices) {
    add(all, p, ViewPath::Access::device);
  }
  // GPUs: NVIDIA's device nodes and the DRM render nodes, for the backends that drive them.
  std::error_code ec;
  for (fs::directory_iterator it("/dev", ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().filename().string().rfind("nvidia", 0) == 0) {
      add(all, it->path(), ViewPath::Access::device);
    }
  }
  add(all, "/dev/dri", ViewPath::Access::device);

  // Parents before children; a path inside a folder of the same access is seen through it (a
  // file to read inside a write folder, whose files are not readable, is not).
  std::stable_sort(all.begin(), all.end(), [](const ViewPath& a, const ViewPath& b) { return a.path < b.path; });
  std::vector<ViewPath> out;
  for (auto& v : all) {
    const bool covered = std::any_of(out.begin(), out.end(), [&](const ViewPath& o) {
      return !o.symlink_to && o.directory && inside(v.path, o.path) && (v.symlink_to || v.access == o.access);
    });
    const auto same = std::find_if(out.begin(), out.end(), [&](const ViewPath& o) { return o.path == v.path; });
    if (same != out.end()) {
      // Named twice (a write folder that is also a backend folder, say): both accesses.
      if (v.access != same->access && !same->symlink_to && !v.symlink_to) {
        same->access = v.access == ViewPath::Access::device || same->access == ViewPath::Access::device
                         ? ViewPath::Access::device
                         : ViewPath::Access::read_write;
      }
    } else if (!covered) {
      out.push_back(std::move(v));
    }
  }
  return out;
}

namespace {

void
check(int rc, const std::string& what)
{
  if (rc != 0) {
    throw Error("sandbox: cannot {}: {}", what, std::strerror(errno));
  }
}

// Makes `path` (and its parents) in the tmpfs where nothing is there yet.
void
make_mount_point(const fs::path& path, bool directory)
{
  struct stat st
  {};
  if (::lstat(path.c_str(), &st) == 0) {
    return;
  }
  fs::create_directories(path.parent_path());
  if (directory) {
    check(::mkdir(path.c_str(), 0755), "make " + path.string());
  } else {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    check(fd < 0 ? -1 : 0, "make " + path.string());
    ::close(fd);
  }
}

// The flags a bind mount keeps when remounted: a user namespace may not clear the ones it
// inherited (mount(2), "locked" flags), so they are read back and kept.
unsigned long
kept_flags(const fs::path& path)
{
  struct statvfs s
  {};
  if (::statvfs(path.c_str(), &s) != 0) {
    return MS_NOSUID | MS_NODEV;
  }
  unsigned long flags = 0;
  const std::pair<unsigned long, unsigned long> map[] = {
    {ST_RDONLY, MS_RDONLY},   {ST_NOSUID, MS_NOSUID},         {ST_NODEV, MS_NODEV},      {ST_NOEXEC, MS_NOEXEC},
    {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME}};
  for (const auto& [st, ms] : map) {
    if ((s.f_flag & st) != 0) {
      flags |= ms;
    }
  }
  return flags;
}

} // namespace

void
enter_mount_view(const fs::path& root, const std::vector<ViewPath>& paths, const fs::path& cwd)
{
  // Nothing done here reaches the host's mounts.
  check(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr), "make the mounts private");
  check(::mount("tmpfs", root.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m"),
        "mount a tmpfs on " + root.string());
  for (const auto& v : paths) {
    const auto target = root / v.path.relative_path();
    if (v.symlink_to) {
      fs::create_directories(target.parent_path());
      if (::symlink(v.symlink_to->c_str(), target.c_str()) != 0 && errno != EEXIST) {
        check(-1, "make the symlink " + v.path.string());
      }
      continue;
    }
    make_mount_point(target, v.directory);
    check(::mount(v.path.c_str(), target.c_str(), nullptr, MS_BIND | MS_REC, nullptr), "bind " + v.path.string());
    auto flags = kept_flags(target) | MS_REMOUNT | MS_BIND | MS_NOSUID;
    if (v.access == ViewPath::Access::read) {
      flags |= MS_RDONLY;
    }
    if (v.access != ViewPath::Access::device) {
      flags |= MS_NODEV;
    }
    check(::mount(nullptr, target.c_str(), nullptr, flags, nullptr), "remount " + v.path.string());
  }
  if (cwd.is_absolute()) {
    std::error_code ec;
    fs::create_directories(root / cwd.relative_path(), ec); // inside a bound folder: there already
  }
  const auto old = root / ".old-root";
  check(::mkdir(old.c_str(), 0700), "make " + old.string());
  check(static_cast<int>(::syscall(SYS_pivot_root, root.c_str(), old.c_str())), "pivot_root");
  check(::chdir("/"), "enter the new root");
  check(::umount2("/.old-root", MNT_DETACH), "detach the old root");
  check(::rmdir("/.old-root"), "remove the old root's mount point");
  check(::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr),
        "make the new root read-only");
  if (::chdir(cwd.c_str()) != 0) {
    check(::chdir("/"), "enter the new root");
  }
}

} // namespace fedl::core::sandbox_detail
