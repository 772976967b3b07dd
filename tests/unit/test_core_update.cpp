// SPDX-License-Identifier: Apache-2.0
// Update signatures (core/trust/update.hpp) and the SHA-256 they stand on.
#include "core/format/safetensors.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <vector>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

// "w" F32 [2,2] = 1..4 and "b" F32 [2] = 5, 6: written b then w (dtype size, then name).
const std::vector<float> k_values{1, 2, 3, 4, 5, 6};

std::vector<TensorView>
views(const std::vector<float>& flat)
{
  const auto bytes = std::as_bytes(std::span(flat));
  return {{"w", DType::f32, {2, 2}, bytes.subspan(0, 16)}, {"b", DType::f32, {2}, bytes.subspan(16)}};
}

std::vector<std::byte>
read_all(const std::filesystem::path& path)
{
  const MappedFile f(path);
  return {f.bytes().begin(), f.bytes().end()};
}

// The bytes fed to a digester in pieces of the given sizes, cycling.
UpdateDigest
digest_in_pieces(std::span<const std::byte> bytes, std::vector<std::size_t> sizes)
{
  UpdateDigester d;
  for (std::size_t at = 0, i = 0; at < bytes.size(); ++i) {
    const auto n = std::min(sizes[i % sizes.size()], bytes.size() - at);
    d.update(bytes.subspan(at, n));
    at += n;
  }
  return d.finish();
}

} // namespace

TEST_CASE("update: Sha256 matches FIPS 180-2's vectors whole and piece by piece")
{
  // FIPS 180-2, appendix B.1 and B.2.
  CHECK(sha256_hex(as_bytes("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  Sha256 h;
  for (std::size_t i = 0; i < two.size(); i += 5) {
    h.update(as_bytes(std::string_view(two).substr(i, 5)));
  }
  CHECK(h.hex() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK_THROWS_AS(h.hex(), Error);
  CHECK(sha256_hex(std::span<const std::byte>{}) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_CASE("update: the v2 digest of a fixed update is the one an independent Python computes")
{
  // Computed with hashlib from fedl-files(5)'s definition: H is the compact sorted JSON of the
  // head, D = SHA-256(u64le(len(H)) || H || data section).
  const TempDir dir;
  const auto path = dir / "u.safetensors";
  const Metadata meta{{"fedl.kind", "update"},
                      {"fedl.num_samples", "10"},
                      {"fedl.signature_version", "2"},
                      {"fedl.site", "alice"},
                      {"fedl.signature", "not covered"}};
  write_safetensors(path, views(k_values), meta);
  const SafetensorsFile file(path);
  CHECK(update_digest_v2(file.content()) == "47dfa2125cf9a8ed7dd3854c3dd0f444c89c1069de1086963490e889348d98ed");
  CHECK(update_head_v2(file.content()) ==
        R"({"fedl":"update-signature-v2","metadata":{"fedl.kind":"update","fedl.num_samples":"10",)"
        R"("fedl.signature_version":"2","fedl.site":"alice"},"tensors":{"b":{"data_offsets":[0,8],"dtype":"F32",)"
        R"("shape":[2]},"w":{"data_offsets":[8,24],"dtype":"F32","shape":[2,2]}}})");
}

TEST_CASE("update: a v2 signature verifies over the digest, and the digest as the bytes pass by is the same")
{
  const TempDir dir;
  const auto ca = create_ca("fedl federation CA unit", {});
  const auto alice = issue_client_certificate(ca, "alice", {});
  auto values = k_values;
  Metadata meta{{"fedl.kind", "update"}, {"fedl.num_samples", "10"}};
  CHECK(sign_update(views(values), meta, alice) == "alice");
  CHECK(meta.at("fedl.signature_version") == "2");
  CHECK(update_signature_version(meta) == 2);
  const auto path = dir / "u.safetensors";
  write_safetensors(path, views(values), meta);
  const auto bytes = read_all(path);
  const SafetensorsFile file(path);
  const auto digest = update_digest_v2(file.content());
  CHECK(verify_signature(alice.cert, as_bytes(update_signed_message_v2(digest)), meta.at("fedl.signature")));
  // Not the v1 payload: a v1 checker refuses it rather than taking it for something else.
  CHECK_FALSE(verify_signature(alice.cert, as_bytes(update_signed_payload(file.content().tensors, meta)),
                               meta.at("fedl.signature")));

  for (const auto& pieces : std::vector<std::vector<std::size_t>>{{1}, {3, 7}, {8, 1000}, {1 << 20}}) {
    const auto streamed = digest_in_pieces(bytes, pieces);
    CHECK(streamed.version == 2);
    CHECK(streamed.hex == digest);
    CHECK(streamed.head == update_head_v2(file.content()));
  }

  SUBCASE("a changed value or metadata entry changes what is signed; the signature's own value does not")
  {
    const auto order = serialize_order(file.content().tensors);
    auto changed = bytes;
    changed.back() ^= std::byte{1};
    CHECK(digest_in_pieces(changed, {64}).hex != digest);
    auto meta2 = meta;
    meta2["fedl.num_samples"] = "11";
    CHECK(update_head_v2(order, meta2) != update_head_v2(order, meta));
    // The signature itself is not covered: signing again gives the same digest.
    auto meta3 = meta;
    meta3["fedl.signature"] = "something else";
    CHECK(update_head_v2(order, meta3) == update_head_v2(order, meta));
  }
  SUBCASE("a header larger than the digester keeps: the file's hash as it passes, the v2 digest from the file")
  {
    Metadata big{{"fedl.kind", "update"}, {"note", std::string(300 * 1024, 'x')}};
    sign_update(views(values), big, alice);
    write_safetensors(dir / "big.safetensors", views(values), big);
    const auto big_bytes = read_all(dir / "big.safetensors");
    const auto passing = digest_in_pieces(big_bytes, {65536});
    CHECK(passing.version == 1);
    CHECK(passing.hex == file_sha256(dir / "big.safetensors"));
    const SafetensorsFile big_file(dir / "big.safetensors");
    CHECK(verify_signature(alice.cert, as_bytes(update_signed_message_v2(update_digest_v2(big_file.content()))),
                           big.at("fedl.signature")));
  }
  SUBCASE("v1 on request: no version entry, the per-tensor payload")
  {
    Metadata v1{{"fedl.kind", "update"}, {"fedl.signature_version", "2"}};
    sign_update(views(values), v1, alice, 1);
    CHECK(v1.count("fedl.signature_version") == 0);
    CHECK(update_signature_version(v1) == 1);
    CHECK(verify_signature(alice.cert, as_bytes(update_signed_payload(views(values), v1)), v1.at("fedl.signature")));
  }
}

TEST_CASE("update: the digester gives a file's SHA-256 for anything that is not a v2 update")
{
  const TempDir dir;
  const auto path = dir / "plain.safetensors";
  write_safetensors(path, views(k_values), {{"fedl.kind", "update"}});
  const auto plain = read_all(path);
  const auto d = digest_in_pieces(plain, {5});
  CHECK(d.version == 1);
  CHECK(d.hex == file_sha256(path));
  CHECK(d.head.empty());

  write_safetensors(path, views(k_values), {{"fedl.signature_version", "3"}});
  const auto unknown = read_all(path);
  CHECK(digest_in_pieces(unknown, {5}).version == 0);
  CHECK(update_signature_version({{"fedl.signature_version", "3"}}) == std::nullopt);

  // Cut short, garbage, a header that claims more than arrives (or more than any update's), one
  // nested too deep: a hash of what arrived, never a crash, a wait or a buffer of that size.
  for (const std::string& junk :
       {std::string("abc"), std::string(8, '\xff') + "xyz", std::string("\x10\0\0\0\0\0\0\0", 8) + "{\"__metadata__\"",
        std::string("\x08\0\0\0\0\0\0\0[[[[[[[[", 16), std::string(100, 'x')}) {
    const auto got = digest_in_pieces(as_bytes(junk), {3});
    CHECK(got.version == 1);
    CHECK(got.hex == sha256_hex(as_bytes(junk)));
  }
}
