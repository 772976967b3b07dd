// SPDX-License-Identifier: Apache-2.0
// cgroup limits for a sandboxed child (Documentation/admin-guide/cgroup-v2.rst; for v1,
// Documentation/admin-guide/cgroup-v1/{memory,pids}.rst and scheduler/sched-bwc.rst).
#include "core/sandbox/sandbox_detail.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core::sandbox_detail {

namespace {

// Where each controller of this process lives: its folder in a v1 hierarchy, or the v2 one.
struct Hierarchies
{
  std::map<std::string, fs::path> v1;      // controller -> this process's folder
  std::optional<fs::path> v2;              // this process's cgroup2 folder
  fs::path v2_mount;                       // the cgroup2 mount point (the root cgroup)
  std::vector<std::string> v2_controllers; // what that folder's children may be given
};

std::string
read_text(const fs::path& path)
{
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// /proc/self/mountinfo (proc(5)): mount root, mount point, then after " - " the type and the
// super options (which name a v1 hierarchy's controllers).
Hierarchies
find_hierarchies()
{
  std::map<std::string, std::string> path_of; // "memory" -> "/a/b" from /proc/self/cgroup; "" for v2
  for (const auto& line : split_text(read_text("/proc/self/cgroup"), "\n")) {
    const auto a = line.find(':');
    const auto b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) {
      continue;
    }
    const auto controllers = line.substr(a + 1, b - a - 1);
    const auto path = line.substr(b + 1);
    if (controllers.empty()) {
      path_of[""] = path;
    }
    for (const auto& c : split_text(controllers, ",")) {
      path_of[c] = path;
    }
  }
  Hierarchies h;
  for (const auto& line : split_text(read_text("/proc/self/mountinfo"), "\n")) {
    std::istringstream fields(line);
    std::string id, parent, dev, root, point;
    fields >> id >> parent >> dev >> root >> point;
    std::string word;
    while (fields >> word && word != "-") {
    }
    std::string type, source, options;
    fields >> type >> source >> options;
    const auto within = [&](const std::string& path) -> std::optional<fs::path> {
      // The mount shows the hierarchy from `root` down; our folder must be inside it.
      if (path.rfind(root, 0) != 0) {
        return std::nullopt;
      }
      return fs::path(point) / fs::path(path.substr(root.size())).relative_path();
    };
    if (type == "cgroup2" && !h.v2 && path_of.count("") != 0) {
      if (auto dir = within(path_of[""])) {
        h.v2 = *dir;
        h.v2_mount = point;
        h.v2_controllers = split_text(read_text(*dir / "cgroup.controllers"), " \n");
      }
    } else if (type == "cgroup") {
      for (const auto& c : split_text(options, ",")) {
        if (path_of.count(c) != 0 && h.v1.count(c) == 0) {
          if (auto dir = within(path_of[c])) {
            h.v1[c] = *dir;
          }
        }
      }
    }
  }
  return h;
}

} // namespace

void
write_kernel_file(const fs::path& path, std::string_view text)
{
  const UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    throw Error("cannot write {} to {}: {}", text, path.string(), std::strerror(errno));
  }
}

std::string
format_bytes(std::uint64_t bytes)
{
  constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  auto value = static_cast<double>(bytes);
  std::size_t unit = 0;
  while (value >= 1024 && unit + 1 < std::size(units)) {
    value /= 1024;
    ++unit;
  }
  return value == std::floor(value) ? fmt::format("{:.0f} {}", value, units[unit])
                                    : fmt::format("{:.1f} {}", value, units[unit]);
}

void
remove_stale_folders(const fs::path& parent)
{
  constexpr std::string_view prefix = "fedl-sandbox-";
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const auto name = it->path().filename().string();
    if (name.rfind(prefix, 0) != 0) {
      continue;
    }
    const auto pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      (void)::rmdir(it->path().c_str());
    }
  }
}

namespace {

// Turns `controllers` on for the children of the cgroup2 folder `dir`.
void
enable_v2(const fs::path& dir, const std::vector<std::string>& controllers)
{
  const auto on = split_text(read_text(dir / "cgroup.subtree_control"), " \n");
  for (const auto& c : controllers) {
    if (std::find(on.begin(), on.end(), c) != on.end()) {
      continue;
    }
    try {
      write_kernel_file(dir / "cgroup.subtree_control", "+" + c);
    } catch (const Error& e) {
      // cgroup v2 lets a cgroup that holds processes (this one holds fedl) hand controllers to
      // children only at the root: the host must delegate a cgroup of fedl's own.
      throw Error("{} (run fedl in a cgroup delegated to it, such as systemd-run --user --scope -p Delegate=yes, "
                  "whose controllers are enabled for its children)",
                  e.what());
    }
  }
}

// The limit of `controller` in the cgroup `dir`, as its version spells it.
void
set_limit(const fs::path& dir, const std::string& controller, const SandboxLimits& limits, bool v2)
{
  const auto quota = std::max<long>(1000, std::lround(limits.cpus.value_or(1) * 1e5)); // per 100 ms
  if (controller == "memory") {
    const auto bytes = std::to_string(*limits.memory_bytes);
    write_kernel_file(dir / (v2 ? "memory.max" : "memory.limit_in_bytes"), bytes);
    // Where swap is accounted, it counts too: the limit is on memory, not on RAM.
    if (v2 && fs::exists(dir / "memory.swap.max")) {
      write_kernel_file(dir / "memory.swap.max", "0");
    } else if (!v2 && fs::exists(dir / "memory.memsw.limit_in_bytes")) {
      write_kernel_file(dir / "memory.memsw.limit_in_bytes", bytes);
    }
  } else if (controller == "cpu") {
    if (v2) {
      write_kernel_file(dir / "cpu.max", fmt::format("{} 100000", quota));
    } else {
      write_kernel_file(dir / "cpu.cfs_period_us", "100000");
      write_kernel_file(dir / "cpu.cfs_quota_us", std::to_string(quota));
    }
  } else {
    write_kernel_file(dir / "pids.max", std::to_string(*limits.pids));
  }
}

} // namespace

std::optional<Cgroups>
Cgroups::make(const SandboxLimits& limits, std::string& why)
{
  std::vector<std::string> wanted;
  for (const auto& [c, given] : {std::pair<const char*, bool>{"memory", limits.memory_bytes.has_value()},
                                 {"cpu", limits.cpus.has_value()},
                                 {"pids", limits.pids.has_value()}}) {
    if (given) {
      wanted.emplace_back(c);
    }
  }
  Cgroups made;
  if (wanted.empty()) {
    return made;
  }
  const auto h = find_hierarchies();
  const auto name = fmt::format("fedl-sandbox-{}", ::getpid());
  const auto make_dir = [&](const fs::path& parent) {
    remove_stale_folders(parent);
    const auto dir = parent / name;
    if (::mkdir(dir.c_str(), 0755) != 0) {
      throw Error("cannot make the cgroup {}: {}", dir.string(), std::strerror(errno));
    }
    made.m_dirs.push_back(dir);
    return dir;
  };
  std::vector<std::string> versions;
  try {
    // v2: one folder for every controller its parent may hand to children; v1 for the rest.
    std::vector<std::string> v2_use;
    for (const auto& c : wanted) {
      if (h.v2 && std::find(h.v2_controllers.begin(), h.v2_controllers.end(), c) != h.v2_controllers.end()) {
        v2_use.push_back(c);
      }
    }
    if (!v2_use.empty()) {
      enable_v2(*h.v2, v2_use);
      const auto dir = make_dir(*h.v2);
      for (const auto& c : v2_use) {
        set_limit(dir, c, limits, true);
      }
      if (limits.memory_bytes && std::find(v2_use.begin(), v2_use.end(), "memory") != v2_use.end()) {
        made.m_memory = dir;
        made.m_memory_v2 = true;
      }
      versions.emplace_back("v2");
    }
    for (const auto& c : wanted) {
      if (std::find(v2_use.begin(), v2_use.end(), c) != v2_use.end()) {
        continue;
      }
      const auto at = h.v1.find(c);
      if (at == h.v1.end()) {
        throw Error("this host offers no cgroup {} controller to this process", c);
      }
      const auto dir = make_dir(at->second);
      set_limit(dir, c, limits, false);
      if (c == "memory") {
        made.m_memory = dir;
      }
      if (versions.empty() || versions.back() != "v1") {
        versions.emplace_back("v1");
      }
    }
  } catch (const Error& e) {
    why = e.what();
    return std::nullopt; // `made` removes what it made
  }
  made.m_version = fmt::format("{}", fmt::join(versions, "+"));
  return made;
}

nlohmann::json
Cgroups::support()
{
  const auto h = find_hierarchies();
  nlohmann::json out = nlohmann::json::object();
  for (const std::string c : {"memory", "cpu", "pids"}) {
    const bool v2 = h.v2 && std::find(h.v2_controllers.begin(), h.v2_controllers.end(), c) != h.v2_controllers.end();
    const auto v1 = h.v1.find(c);
    const auto dir = v2 ? *h.v2 : v1 != h.v1.end() ? v1->second : fs::path();
    if (dir.empty()) {
      out[c] = {{"version", nullptr}, {"usable", false}, {"why", "no hierarchy of this process has it"}};
      continue;
    }
    std::string why;
    if (::access(dir.c_str(), W_OK) != 0) {
      why = fmt::format("{} is not writable by this user (not delegated)", dir.string());
    } else if (v2 && dir != h.v2_mount) {
      // Children get the controller only if it is on in subtree_control, which a cgroup that
      // holds processes (this one holds fedl) cannot turn on, but at the root.
      const auto on = split_text(read_text(dir / "cgroup.subtree_control"), " \n");
      if (std::find(on.begin(), on.end(), c) == on.end()) {
        why = fmt::format("{} does not hand {} to its children (cgroup.subtree_control) and holds fedl: run fedl in "
                          "a cgroup delegated to it",
                          dir.string(), c);
      }
    }
    out[c] = {{"version", v2 ? "v2" : "v1"}, {"folder", dir.string()}, {"usable", why.empty()}};
    if (!why.empty()) {
      out[c]["why"] = why;
    }
  }
  return out;
}

Cgroups::Cgroups(Cgroups&& other) noexcept
  : m_dirs(std::move(other.m_dirs)),
    m_memory(std::move(other.m_memory)),
    m_memory_v2(other.m_memory_v2),
    m_version(std::move(other.m_version))
{
  other.m_dirs.clear();
}

Cgroups::~Cgroups()
{
  for (const auto& dir : m_dirs) {
    (void)::rmdir(dir.c_str());
  }
}

void
Cgroups::add(pid_t pid) const
{
  for (const auto& dir : m_dirs) {
    write_kernel_file(dir / "cgroup.procs", std::to_string(pid));
  }
}

bool
Cgroups::memory_exceeded() const
{
  if (!m_memory) {
    return false;
  }
  // v2: memory.events "oom_kill N"; v1: memory.oom_control "oom_kill N" (Linux 4.13+).
  const auto text = read_text(*m_memory / (m_memory_v2 ? "memory.events" : "memory.oom_control"));
  const auto at = text.find("oom_kill ");
  return at != std::string::npos && std::strtoull(text.c_str() + at + 9, nullptr, 10) > 0;
}

} // namespace fedl::core::sandbox_detail
