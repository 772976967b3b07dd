// SPDX-License-Identifier: Apache-2.0
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>
#include <unistd.h>
#include <zlib.h>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

std::string
gzip(const std::string& data)
{
  z_stream zs{};
  deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&zs, data.size()) + 32, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

std::string
to_string(const std::vector<std::byte>& v)
{
  return {reinterpret_cast<const char*>(v.data()), v.size()};
}

} // namespace

TEST_SUITE_BEGIN("core");

TEST_CASE("core::sha256_hex matches the FIPS 180-2 test vectors")
{
  CHECK(sha256_hex(as_bytes("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex(as_bytes("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const std::array<std::span<const std::byte>, 2> parts{as_bytes("a"), as_bytes("bc")};
  CHECK(sha256_hex(parts) == sha256_hex(as_bytes("abc")));
}

TEST_CASE("core::read_maybe_gzip reads plain and gzip files and rejects corrupt gzip")
{
  TempDir dir;
  const std::string text(100000, 'x');
  fedl::test::write_file(dir / "plain", "hello");
  fedl::test::write_file(dir / "z.gz", gzip(text));
  fedl::test::write_file(dir / "two.gz", gzip("ab") + gzip("cd"));
  CHECK(to_string(read_maybe_gzip(dir / "plain")) == "hello");
  CHECK(to_string(read_maybe_gzip(dir / "z.gz")) == text);
  CHECK(to_string(read_maybe_gzip(dir / "two.gz")) == "abcd");

  const auto z = gzip(text);
  fedl::test::write_file(dir / "trunc.gz", z.substr(0, z.size() / 2));
  CHECK_THROWS_AS(read_maybe_gzip(dir / "trunc.gz"), VerifyError);
  std::string corrupt = z;
  corrupt[12] = static_cast<char>(corrupt[12] ^ 0x55);
  corrupt[13] = static_cast<char>(corrupt[13] ^ 0x55);
  fedl::test::write_file(dir / "bad.gz", corrupt);
  CHECK_THROWS_AS(read_maybe_gzip(dir / "bad.gz"), VerifyError);
  // A bomb stops at the limit instead of allocating without bound.
  CHECK_THROWS_AS(read_maybe_gzip(dir / "z.gz", 1000), VerifyError);
}

TEST_CASE("core::MappedFile names a missing file")
{
  try {
    MappedFile f("/nonexistent/fedl-file");
    FAIL("opened a missing file");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::failure);
    CHECK(std::string(e.what()).find("/nonexistent/fedl-file") != std::string::npos);
  }
}

TEST_CASE("core::atomic_write replaces the file and leaves nothing behind on failure")
{
  TempDir dir;
  atomic_write(dir / "f", "one");
  atomic_write(dir / "f", "two");
  CHECK(fedl::test::read_file(dir / "f") == "two");
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()) == 1);
  CHECK_THROWS_AS(atomic_write(dir / "no-such-dir" / "f", "x"), Error);
  if (::geteuid() != 0) { // root ignores permission bits
    std::filesystem::permissions(dir.path(), std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
    CHECK_THROWS_AS(atomic_write(dir / "f", "three"), Error);
    std::filesystem::permissions(dir.path(), std::filesystem::perms::owner_all);
    CHECK(fedl::test::read_file(dir / "f") == "two");
  }
}

TEST_SUITE_END();

TEST_CASE("file_io: append_line adds whole lines and names the file it cannot append to")
{
  TempDir t;
  const auto path = t / "log.jsonl";
  append_line(path, "{\"seq\":0}\n");
  append_line(path, "{\"seq\":1}\n");
  const MappedFile written(path);
  CHECK(std::string(reinterpret_cast<const char*>(written.bytes().data()), written.bytes().size()) ==
        "{\"seq\":0}\n{\"seq\":1}\n");
  CHECK_THROWS_WITH_AS(append_line(t / "missing" / "log.jsonl", "x\n"),
                       doctest::Contains(("cannot append to " + (t / "missing" / "log.jsonl").string()).c_str()),
                       Error);
}
