// SPDX-License-Identifier: Apache-2.0
// Reading and writing files: mmap for reading, atomic replace (temp file, fsync, rename) for
// writing, transparent gzip, SHA-256 of contents.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

struct evp_md_ctx_st; // OpenSSL's EVP_MD_CTX

namespace fedl::core {

// A read-only memory map of a whole file. Throws Error (exit 1) naming the file if it cannot be
// opened or mapped. An empty file maps to an empty span.
class MappedFile
{
public:
  explicit MappedFile(const std::filesystem::path& path);
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  ~MappedFile();

  std::span<const std::byte> bytes() const noexcept { return {m_data, m_size}; }
  const std::filesystem::path& path() const noexcept { return m_path; }
  // Drops the mapped pages from this process's resident set (MADV_DONTNEED); they stay in the
  // page cache and a later access maps them again.
  void release() const noexcept;

private:
  std::filesystem::path m_path;
  const std::byte* m_data = nullptr;
  std::size_t m_size = 0;
};

// True if `bytes` start with the gzip magic number.
bool is_gzip(std::span<const std::byte> bytes) noexcept;

// The file's contents, gunzipped if they are gzip. `what` names the file in errors.
// Throws Error (exit 1) if it cannot be read, VerifyError (exit 3) if the gzip stream is
// corrupt or truncated. Refuses to inflate past `max_size` bytes (exit 3).
std::vector<std::byte> read_maybe_gzip(const std::filesystem::path& path, std::size_t max_size = std::size_t{16} << 30);

// An owned file descriptor (-1: none), closed when it goes.
class UniqueFd
{
public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : m_fd(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& other) noexcept : m_fd(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return m_fd; }
  explicit operator bool() const noexcept { return m_fd >= 0; }
  int release() noexcept
  {
    const int fd = m_fd;
    m_fd = -1;
    return fd;
  }
  void reset(int fd = -1) noexcept;

private:
  int m_fd = -1;
};

// How atomic_write creates the file: `normal` with mode 0644 (less the umask); `secret` (private
// keys) with mode 0600 whatever the umask, never through a symbolic link, so that the contents
// never exist with wider permissions.
enum class FileMode
{
  normal,
  secret,
  // A file that says how things are now, not a record (fedl serve's status): replaced whole by
  // rename, without fsync, so that writing it never waits for the disk; after a crash of the
  // machine it may be old or empty.
  transient
};

// A SHA-256 computed piece by piece (OpenSSL's EVP): for bytes that pass by once, as they
// arrive from a peer or are written to a file. Throws Error only if OpenSSL cannot start one.
class Sha256
{
public:
  Sha256();
  ~Sha256();
  Sha256(Sha256&& other) noexcept;
  Sha256& operator=(Sha256&& other) noexcept;
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(std::span<const std::byte> bytes) noexcept;
  // The digest in lower-case hex. The object is then spent: update() does nothing, hex() throws.
  std::string hex();
  // The same, as 32 bytes.
  std::array<std::byte, 32> digest();

private:
  evp_md_ctx_st* m_ctx;
};

// Writes `parts` one after the other to `path` atomically: a temporary file in the same folder,
// fsync, rename over `path`, fsync of the folder. On any failure the temporary file is removed
// and `path` is left as it was. Throws Error naming the path.
// With `hash`, each piece is also fed to it just before it is written (while it is in cache).
void atomic_write(const std::filesystem::path& path, std::span<const std::span<const std::byte>> parts,
                  FileMode mode = FileMode::normal, Sha256* hash = nullptr);
void atomic_write(const std::filesystem::path& path, std::string_view contents, FileMode mode = FileMode::normal);

// fsyncs the folder `dir` (a rename or a new file in it made durable). Best effort: never throws.
void sync_folder(const std::filesystem::path& dir) noexcept;

// Appends `line` (one whole line, with its newline) to `path` (created 0644 if absent) and
// fsyncs it; a write cut short is taken back (the file is truncated to its size before), so that
// the file stays a sequence of whole lines. Throws Error naming the file.
void append_line(const std::filesystem::path& path, std::string_view line);

// Lower-case hex SHA-256, as sha256sum prints it.
std::string sha256_hex(std::span<const std::byte> bytes);
std::string sha256_hex(std::span<const std::span<const std::byte>> parts);
// SHA-256 of a file's contents. Throws Error naming the file if it cannot be read.
std::string file_sha256(const std::filesystem::path& path);

inline std::span<const std::byte>
as_bytes(std::string_view s) noexcept
{
  return std::as_bytes(std::span(s.data(), s.size()));
}

// `value` as `n` (at most 8) little-endian bytes at `out`, and back: the size fields of frames,
// safetensors headers, update digests and fork server requests.
inline void
put_le(std::byte* out, std::uint64_t value, std::size_t n) noexcept
{
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = static_cast<std::byte>((value >> (8 * i)) & 0xff);
  }
}

inline std::uint64_t
get_le(const std::byte* in, std::size_t n) noexcept
{
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) {
    v |= std::to_integer<std::uint64_t>(in[i]) << (8 * i);
  }
  return v;
}

} // namespace fedl::core
