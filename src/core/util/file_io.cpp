// SPDX-License-Identifier: Apache-2.0
#include "core/util/file_io.hpp"

#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <exception>
#include <random>
#include <system_error>
#include <thread>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

std::string
errno_text(int err)
{
  return std::strerror(err);
}

// Finishes and frees `ctx` (a SHA-256); the digest.
std::array<std::byte, 32>
finish(EVP_MD_CTX* ctx)
{
  std::array<std::byte, 32> md{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, reinterpret_cast<unsigned char*>(md.data()), &len);
  EVP_MD_CTX_free(ctx);
  return md;
}

// The same as lowercase hex.
std::string
finish_hex(EVP_MD_CTX* ctx)
{
  return hex_encode(finish(ctx));
}

} // namespace

MappedFile::MappedFile(const fs::path& path) : m_path(path)
{
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    throw Error("cannot open {}: {}", path.string(), errno_text(errno));
  }
  struct stat st
  {};
  if (::fstat(fd.get(), &st) != 0) {
    throw Error("cannot stat {}: {}", path.string(), errno_text(errno));
  }
  if (S_ISDIR(st.st_mode)) {
    throw Error("{} is a directory, not a file", path.string());
  }
  m_size = static_cast<std::size_t>(st.st_size);
  if (m_size == 0) {
    return;
  }
  void* p = ::mmap(nullptr, m_size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (p == MAP_FAILED) {
    throw Error("cannot read {}: {}", path.string(), errno_text(errno));
  }
  m_data = static_cast<const std::byte*>(p);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
  : m_path(std::move(other.m_path)),
    m_data(std::exchange(other.m_data, nullptr)),
    m_size(std::exchange(other.m_size, 0))
{
}

MappedFile&
MappedFile::operator=(MappedFile&& other) noexcept
{
  if (this != &other) {
    if (m_data != nullptr) {
      ::munmap(const_cast<std::byte*>(m_data), m_size);
    }
    m_path = std::move(other.m_path);
    m_data = std::exchange(other.m_data, nullptr);
    m_size = std::exchange(other.m_size, 0);
  }
  return *this;
}

void
MappedFile::release() const noexcept
{
  if (m_data != nullptr && m_size > 0) {
    ::madvise(const_cast<std::byte*>(m_data), m_size, MADV_DONTNEED);
  }
}

MappedFile::~MappedFile()
{
  if (m_data != nullptr) {
    ::munmap(const_cast<std::byte*>(m_data), m_size);
  }
}

bool
is_gzip(std::span<const std::byte> bytes) noexcept
{
  return bytes.size() >= 2 && bytes[0] == std::byte{0x1f} && bytes[1] == std::byte{0x8b};
}

std::vector<std::byte>
read_maybe_gzip(const fs::path& path, std::size_t max_size)
{
  const MappedFile file(path);
  const auto in = file.bytes();
  if (!is_gzip(in)) {
    return {in.begin(), in.end()};
  }
  z_stream zs{};
  // 16 + MAX_WBITS: gzip wrapper only. Concatenated members are handled by the loop below.
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) {
    throw Error("cannot start gzip decoder for {}", path.string());
  }
  std::vector<std::byte> out;
  out.resize(std::min<std::size_t>(std::max<std::size_t>(in.size() * 4, 1 << 16), max_size));
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  std::size_t remaining_in = in.size();
  std::size_t produced = 0;
  int rc = Z_OK;
  for (;;) {
    if (produced == out.size()) {
      if (out.size() >= max_size) {
        inflateEnd(&zs);
        throw VerifyError("{}: gzip content is larger than the limit of {} bytes", path.string(), max_size);
      }
      out.resize(std::min(out.size() * 2, max_size));
    }
    const auto in_chunk = static_cast<uInt>(std::min<std::size_t>(remaining_in, 1U << 30));
    const auto out_chunk = static_cast<uInt>(std::min<std::size_t>(out.size() - produced, 1U << 30));
    zs.avail_in = in_chunk;
    zs.next_out = reinterpret_cast<Bytef*>(out.data() + produced);
    zs.avail_out = out_chunk;
    rc = inflate(&zs, Z_NO_FLUSH);
    remaining_in -= in_chunk - zs.avail_in;
    produced += out_chunk - zs.avail_out;
    if (rc == Z_STREAM_END) {
      if (remaining_in == 0) {
        break;
      }
      // Another gzip member follows (as `cat a.gz b.gz` makes).
      if (inflateReset(&zs) != Z_OK) {
        break;
      }
      continue;
    }
    if (rc == Z_BUF_ERROR && remaining_in == 0) {
      inflateEnd(&zs);
      throw VerifyError("{}: gzip data is truncated (the file ends mid-stream); fetch or copy it again", path.string());
    }
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      const std::string msg = zs.msg != nullptr ? zs.msg : "unknown error";
      inflateEnd(&zs);
      throw VerifyError("{}: corrupt gzip data ({})", path.string(), msg);
    }
  }
  inflateEnd(&zs);
  out.resize(produced);
  return out;
}

void
atomic_write(const fs::path& path, std::span<const std::span<const std::byte>> parts, FileMode mode, Sha256* hash)
{
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::random_device rd;
  const fs::path tmp = dir / fmt::format(".{}.tmp-{:08x}", path.filename().string(), rd());
  const bool secret = mode == FileMode::secret;
  UniqueFd fd(
    ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (secret ? O_NOFOLLOW : 0), secret ? 0600 : 0644));
  if (fd.get() < 0) {
    throw Error("cannot write {}: {}", path.string(), errno_text(errno));
  }
  auto fail = [&](const char* what, int err) {
    ::unlink(tmp.c_str());
    throw Error("cannot write {}: {} ({})", path.string(), errno_text(err), what);
  };
  if (secret && ::fchmod(fd.get(), 0600) != 0) {
    fail("chmod", errno);
  }
  // A large file is hashed on a second thread while this one writes it and waits for fsync: the
  // bytes do not change meanwhile, and neither has to wait for the other.
  constexpr std::size_t slice = std::size_t{1} << 20;
  std::size_t total = 0;
  for (const auto part : parts) {
    total += part.size();
  }
  std::exception_ptr hash_error;
  std::jthread hasher;
  if (hash != nullptr && total >= 4 * slice) {
    try {
      hasher = std::jthread([&parts, &hash_error, h = hash] {
        try {
          for (const auto part : parts) {
            h->update(part);
          }
        } catch (...) {
          hash_error = std::current_exception();
        }
      });
      hash = nullptr;
    } catch (const std::system_error&) {
      // No thread to be had: hashed here, piece by piece.
    }
  }
  for (const auto part : parts) {
    for (std::size_t at = 0; at < part.size(); at += slice) {
      const auto piece = part.subspan(at, std::min(slice, part.size() - at));
      if (hash != nullptr) {
        hash->update(piece);
      }
      const std::byte* p = piece.data();
      std::size_t left = piece.size();
      while (left > 0) {
        const ssize_t n = ::write(fd.get(), p, left);
        if (n < 0) {
          if (errno == EINTR) {
            continue;
          }
          fail("write", errno);
        }
        p += n;
        left -= static_cast<std::size_t>(n);
      }
    }
  }
  const bool durable = mode != FileMode::transient;
  if (durable && ::fsync(fd.get()) != 0) {
    fail("fsync", errno);
  }
  if (::close(fd.release()) != 0) {
    fail("close", errno);
  }
  if (hasher.joinable()) {
    hasher.join();
    if (hash_error) {
      ::unlink(tmp.c_str());
      std::rethrow_exception(hash_error);
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    fail("rename", errno);
  }
  if (durable) {
    sync_folder(dir);
  }
}

void
sync_folder(const fs::path& dir) noexcept
{
  if (const UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)); dfd) {
    ::fsync(dfd.get());
  }
}

void
atomic_write(const fs::path& path, std::string_view contents, FileMode mode)
{
  const std::array<std::span<const std::byte>, 1> parts{as_bytes(contents)};
  atomic_write(path, parts, mode);
}

UniqueFd&
UniqueFd::operator=(UniqueFd&& other) noexcept
{
  if (this != &other) {
    reset(other.release());
  }
  return *this;
}

void
UniqueFd::reset(int fd) noexcept
{
  if (m_fd >= 0) {
    ::close(m_fd);
  }
  m_fd = fd;
}

Sha256::Sha256() : m_ctx(EVP_MD_CTX_new())
{
  if (m_ctx == nullptr || EVP_DigestInit_ex(m_ctx, EVP_sha256(), nullptr) != 1) {
    EVP_MD_CTX_free(m_ctx);
    throw Error("OpenSSL: cannot start SHA-256");
  }
}

Sha256::~Sha256()
{
  EVP_MD_CTX_free(m_ctx);
}

Sha256::Sha256(Sha256&& other) noexcept : m_ctx(std::exchange(other.m_ctx, nullptr)) {}

Sha256&
Sha256::operator=(Sha256&& other) noexcept
{
  if (this != &other) {
    EVP_MD_CTX_free(m_ctx);
    m_ctx = std::exchange(other.m_ctx, nullptr);
  }
  return *this;
}

void
Sha256::update(std::span<const std::byte> bytes) noexcept
{
  if (m_ctx != nullptr && !bytes.empty()) {
    EVP_DigestUpdate(m_ctx, bytes.data(), bytes.size());
  }
}

std::string
Sha256::hex()
{
  if (m_ctx == nullptr) {
    throw Error("internal: a SHA-256 was finished twice");
  }
  return finish_hex(std::exchange(m_ctx, nullptr));
}

std::array<std::byte, 32>
Sha256::digest()
{
  if (m_ctx == nullptr) {
    throw Error("internal: a SHA-256 was finished twice");
  }
  return finish(std::exchange(m_ctx, nullptr));
}

std::string
sha256_hex(std::span<const std::span<const std::byte>> parts)
{
  Sha256 h;
  for (const auto part : parts) {
    h.update(part);
  }
  return h.hex();
}

std::string
sha256_hex(std::span<const std::byte> bytes)
{
  const std::array<std::span<const std::byte>, 1> parts{bytes};
  return sha256_hex(parts);
}

std::string
file_sha256(const fs::path& path)
{
  // read() rather than mmap: hashing a large file must not leave it resident in this process.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    throw Error("cannot open {}: {}", path.string(), errno_text(errno));
  }
  Sha256 h;
  std::vector<std::byte> buf(std::size_t{1} << 20);
  for (;;) {
    const auto n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      throw Error("cannot read {}: {}", path.string(), errno_text(errno));
    }
    if (n == 0) {
      break;
    }
    h.update(std::span(buf).first(static_cast<std::size_t>(n)));
  }
  return h.hex();
}

void
append_line(const fs::path& path, std::string_view line)
{
  const UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!fd) {
    throw Error("cannot append to {}: {}", path.string(), errno_text(errno));
  }
  struct stat st
  {};
  if (::fstat(fd.get(), &st) != 0) {
    throw Error("cannot append to {}: {}", path.string(), errno_text(errno));
  }
  const auto n = ::write(fd.get(), line.data(), line.size());
  const int write_errno = errno;
  if (n != static_cast<ssize_t>(line.size())) {
    if (n > 0) {
      // Take the partial line back so that the file stays a sequence of whole lines.
      (void)::ftruncate(fd.get(), st.st_size);
    }
    throw Error("cannot append to {}: {}", path.string(), n < 0 ? errno_text(write_errno) : "short write");
  }
  if (::fsync(fd.get()) != 0) {
    throw Error("cannot append to {}: fsync: {}", path.string(), errno_text(errno));
  }
}

} // namespace fedl::core
