// SPDX-License-Identifier: Apache-2.0
#include "core/format/safetensors.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <array>
#include <cstring>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

std::span<const std::byte>
bytes_of(const std::vector<float>& v)
{
  return std::as_bytes(std::span(v));
}

std::string
le64(std::uint64_t n)
{
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) {
    s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  }
  return s;
}

std::span<const std::byte>
span_of(const std::string& s)
{
  return as_bytes(s);
}

} // namespace

TEST_SUITE_BEGIN("core");

TEST_CASE("core::safetensors writes the published layout byte for byte")
{
  // Two tensors, one F64 and one F32: F64 comes first (larger dtype), the header is compact
  // JSON padded with spaces to a multiple of 8, offsets index the data buffer.
  const std::vector<float> a{1.0F, 2.0F};
  const std::vector<double> b{3.0};
  const std::vector<TensorView> tensors{
    {"a", DType::f32, {2}, bytes_of(a)},
    {"b", DType::f64, {1, 1}, std::as_bytes(std::span(b))},
  };
  TempDir dir;
  write_safetensors(dir / "x.safetensors", tensors, {{"fedl.kind", "model"}});
  const auto file = fedl::test::read_file(dir / "x.safetensors");
  const std::string json =
    R"({"__metadata__":{"fedl.kind":"model"},"b":{"dtype":"F64","shape":[1,1],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";
  const std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  std::string expected = le64(padded.size()) + padded;
  expected.append(reinterpret_cast<const char*>(b.data()), 8);
  expected.append(reinterpret_cast<const char*>(a.data()), 8);
  CHECK(file == expected);
  CHECK(safetensors_sha256(tensors, {{"fedl.kind", "model"}}) == sha256_hex(span_of(file)));
}

TEST_CASE("core::safetensors round-trips names, shapes, dtypes, data and metadata")
{
  std::vector<float> w(12);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i] = static_cast<float>(i) * 0.5F;
  }
  const std::vector<TensorView> tensors{{"layers.0.weight", DType::f32, {3, 4}, bytes_of(w)}};
  TempDir dir;
  write_safetensors(dir / "m.safetensors", tensors, {{"fedl.arch", "mlp:4"}, {"k", "v"}});
  const SafetensorsFile f(dir / "m.safetensors");
  REQUIRE(f.content().tensors.size() == 1);
  const auto& t = f.content().tensors[0];
  CHECK(t.name == "layers.0.weight");
  CHECK(t.dtype == DType::f32);
  CHECK(t.shape == std::vector<std::int64_t>{3, 4});
  REQUIRE(t.data.size() == 48);
  CHECK(std::memcmp(t.data.data(), w.data(), 48) == 0);
  CHECK(f.content().meta("fedl.arch") == "mlp:4");
  CHECK(f.content().meta("missing") == std::nullopt);
  // Nothing else is left in the folder (no temporary file).
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()) == 1);
}

TEST_CASE("core::safetensors rejects corrupt and truncated files with VerifyError")
{
  const std::vector<float> w{1, 2, 3, 4};
  const std::vector<TensorView> tensors{{"w", DType::f32, {4}, bytes_of(w)}};
  TempDir dir;
  write_safetensors(dir / "ok.safetensors", tensors, {});
  const auto good = fedl::test::read_file(dir / "ok.safetensors");

  auto rejects = [](const std::string& bytes, const char* needle) {
    try {
      (void)parse_safetensors(span_of(bytes), "f");
      FAIL("accepted: " << needle);
    } catch (const VerifyError& e) {
      CHECK(e.code() == ExitCode::verify);
      CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
    }
  };
  rejects(good.substr(0, good.size() - 1), "outside the file");
  rejects(good.substr(0, 5), "8-byte header size");
  rejects(good.substr(0, 20), "truncated");
  rejects(le64(1ULL << 40) + "{}", "header claims");
  rejects(le64(2) + "{x", "corrupt safetensors header");
  rejects(le64(2) + "[]", "not a JSON object");
  rejects(good + "xx", "after the last tensor");
  const std::string bad_dtype = R"({"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})";
  rejects(le64(bad_dtype.size()) + bad_dtype + "x", "unknown dtype");
  const std::string wrong_size = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})";
  rejects(le64(wrong_size.size()) + wrong_size + "xxxx", "shape needs");
  const std::string overlap =
    R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})";
  rejects(le64(overlap.size()) + overlap + "xyz", "gap or overlap");
  const std::string meta = R"({"__metadata__":{"k":1}})";
  rejects(le64(meta.size()) + meta, "not a string");
}

TEST_CASE("core::safetensors refuses duplicate names and data that do not match the shape")
{
  const std::vector<float> w{1, 2};
  TempDir dir;
  const std::vector<TensorView> dup{{"w", DType::f32, {2}, bytes_of(w)}, {"w", DType::f32, {2}, bytes_of(w)}};
  CHECK_THROWS_AS(write_safetensors(dir / "d", dup, {}), UsageError);
  const std::vector<TensorView> bad{{"w", DType::f32, {3}, bytes_of(w)}};
  CHECK_THROWS_AS(write_safetensors(dir / "b", bad, {}), UsageError);
  CHECK_FALSE(std::filesystem::exists(dir / "d"));
  CHECK_FALSE(std::filesystem::exists(dir / "b"));
}

TEST_CASE("core::tensor_listing and listing_difference: what a trainer's update must hold of the model")
{
  const std::vector<float> w{1, 2, 3, 4};
  auto listing = [&](std::vector<TensorView> tensors) {
    Safetensors st;
    st.tensors = std::move(tensors);
    return tensor_listing(st);
  };
  const auto model = listing({{"fc.weight", DType::f32, {2, 2}, bytes_of(w)}, {"fc.bias", DType::f32, {2}, {}}});
  CHECK(listing_difference(model, listing({{"fc.bias", DType::f32, {2}, {}}, {"fc.weight", DType::f32, {2, 2}, {}}}))
          .empty());
  CHECK(listing_difference(model, listing({{"fc.weight", DType::f32, {2, 2}, {}}})) == "tensor 'fc.bias' is missing");
  CHECK(listing_difference(model, listing({{"fc.weight", DType::f32, {4}, {}}, {"fc.bias", DType::f32, {2}, {}}})) ==
        "tensor 'fc.weight' has another dtype or shape");
  CHECK(listing_difference(model, listing({{"fc.weight", DType::f64, {2, 2}, {}}, {"fc.bias", DType::f32, {2}, {}}})) ==
        "tensor 'fc.weight' has another dtype or shape");
  CHECK(listing_difference(model, listing({{"fc.weight", DType::f32, {2, 2}, {}},
                                           {"fc.bias", DType::f32, {2}, {}},
                                           {"stolen", DType::u8, {100}, {}}})) ==
        "tensor 'stolen' is not one of the model's");
}

TEST_SUITE_END();
