// SPDX-License-Identifier: Apache-2.0
// Reading the updates from their files: the descriptors that pread() uses, checked to be the very
// files that are mapped, and the window of the PageReleaser.
#include "core/math/aggregate_detail.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <array>
#include <cstdio>

namespace fedl::core::aggregate_detail {

namespace {

// Resident mapped bytes of the update files that all threads together keep, at most (roughly).
constexpr std::size_t k_resident_budget = std::size_t{16} << 20;

struct MapEntry
{
  std::uintptr_t lo = 0;
  std::uintptr_t hi = 0;
  unsigned major = 0;
  unsigned minor = 0;
  unsigned long inode = 0;
};

std::vector<MapEntry>
read_maps()
{
  std::vector<MapEntry> out;
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (f == nullptr) {
    return out;
  }
  std::array<char, 4096> line{};
  while (std::fgets(line.data(), static_cast<int>(line.size()), f) != nullptr) {
    MapEntry e;
    unsigned long lo = 0;
    unsigned long hi = 0;
    unsigned long offset = 0;
    char perms[8] = {};
    if (std::sscanf(line.data(), "%lx-%lx %7s %lx %x:%x %lu", &lo, &hi, perms, &offset, &e.major, &e.minor, &e.inode) ==
        7) {
      e.lo = lo;
      e.hi = hi;
      out.push_back(e);
    }
  }
  std::fclose(f);
  return out;
}

} // namespace

std::size_t
release_window(std::size_t sources, unsigned threads)
{
  const std::size_t w = k_resident_budget / (sources * threads);
  return std::clamp<std::size_t>(w, std::size_t{64} << 10, std::size_t{4} << 20);
}

Descriptors::Descriptors(std::span<const SafetensorsFile* const> files, const std::vector<bool>& wanted)
  : m_fds(files.size(), -1)
{
  if (std::none_of(wanted.begin(), wanted.end(), [](bool w) { return w; })) {
    return;
  }
  const auto maps = read_maps();
  for (std::size_t i = 0; i < files.size(); ++i) {
    const auto bytes = files[i]->bytes();
    if (!wanted[i] || bytes.empty()) {
      continue;
    }
    const auto a = reinterpret_cast<std::uintptr_t>(bytes.data());
    const auto it = std::find_if(maps.begin(), maps.end(), [&](const MapEntry& e) { return e.lo <= a && a < e.hi; });
    if (it == maps.end()) {
      continue;
    }
    const int fd = ::open(files[i]->path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      continue;
    }
    struct stat st
    {};
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && static_cast<std::size_t>(st.st_size) == bytes.size() &&
        st.st_ino == it->inode && major(st.st_dev) == it->major && minor(st.st_dev) == it->minor) {
      m_fds[i] = fd;
    } else {
      ::close(fd);
    }
  }
}

} // namespace fedl::core::aggregate_detail
