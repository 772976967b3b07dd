// SPDX-License-Identifier: Apache-2.0
#include "core/format/model_spec.hpp"
#include "core/format/tensor.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

using namespace fedl::core;

TEST_SUITE_BEGIN("core");

TEST_CASE("core::parse_model_spec accepts the zoo and rejects the rest with exit 2")
{
  CHECK(parse_model_spec("logreg").kind == ArchKind::logreg);
  const auto mlp = parse_model_spec("mlp:128,64");
  CHECK(mlp.kind == ArchKind::mlp);
  CHECK(mlp.hidden == std::vector<std::int64_t>{128, 64});
  CHECK(mlp.text == "mlp:128,64");
  CHECK(parse_model_spec("cnn").kind == ArchKind::cnn);
  for (const char* bad : {"resnet", "mlp", "mlp:", "mlp:0", "mlp:a", "", "cnn:3"}) {
    CAPTURE(bad);
    try {
      (void)parse_model_spec(bad);
      FAIL("accepted");
    } catch (const UsageError& e) {
      CHECK(e.code() == ExitCode::usage);
    }
  }
  CHECK_NOTHROW(parse_model_spec("cnn").check_input({1, 28, 28}));
  CHECK_NOTHROW(parse_model_spec("cnn").check_input({784}));
  CHECK_THROWS_AS(parse_model_spec("cnn").check_input({64}), UsageError);
  CHECK_NOTHROW(parse_model_spec("logreg").check_input({64}));
}

TEST_CASE("core::weight_delta is after - before, tensor by tensor")
{
  const std::vector<float> a{1.5F, 2.0F};
  const std::vector<float> b{0.5F, 3.0F};
  const std::vector<TensorView> after{{"w", DType::f32, {2}, std::as_bytes(std::span(a))}};
  const std::vector<TensorView> before{{"w", DType::f32, {2}, std::as_bytes(std::span(b))}};
  const auto d = weight_delta(after, before);
  REQUIRE(d.size() == 1);
  std::vector<float> got(2);
  std::memcpy(got.data(), d[0].bytes.data(), 8);
  CHECK(got == std::vector<float>{1.0F, -1.0F});
  const std::vector<TensorView> other{{"v", DType::f32, {2}, std::as_bytes(std::span(b))}};
  CHECK_THROWS_AS(weight_delta(after, other), VerifyError);
  const std::vector<TensorView> reshaped{{"w", DType::f32, {1, 2}, std::as_bytes(std::span(b))}};
  CHECK_THROWS_AS(weight_delta(after, reshaped), VerifyError);
}

TEST_CASE("core::weight_delta and copy_tensors reuse the buffers of an earlier call, on unaligned views too")
{
  // F64 values one byte into a buffer (a mapped safetensors file aligns only to its header), and
  // an F32 tensor, over a length that no vector width divides.
  const std::size_t n = 1001;
  std::vector<std::byte> raw_a(1 + n * 8);
  std::vector<std::byte> raw_b(1 + n * 8);
  std::vector<float> fa(n);
  std::vector<float> fb(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double x = 0.25 * static_cast<double>(i);
    const double y = -1.0 / static_cast<double>(i + 1);
    std::memcpy(raw_a.data() + 1 + i * 8, &x, 8);
    std::memcpy(raw_b.data() + 1 + i * 8, &y, 8);
    fa[i] = static_cast<float>(i) * 0.5F;
    fb[i] = 1.0F / static_cast<float>(i + 3);
  }
  const auto shape = std::vector<std::int64_t>{static_cast<std::int64_t>(n)};
  const std::vector<TensorView> after{{"d", DType::f64, shape, std::span(raw_a).subspan(1)},
                                      {"f", DType::f32, shape, std::as_bytes(std::span(fa))}};
  const std::vector<TensorView> before{{"d", DType::f64, shape, std::span(raw_b).subspan(1)},
                                       {"f", DType::f32, shape, std::as_bytes(std::span(fb))}};
  auto first = weight_delta(after, before);
  const std::byte* d_buffer = first[0].bytes.data();
  const std::byte* f_buffer = first[1].bytes.data();
  const auto again = weight_delta(after, before, std::move(first));
  CHECK(again[0].bytes.data() == d_buffer);
  CHECK(again[1].bytes.data() == f_buffer);
  for (std::size_t i = 0; i < n; ++i) {
    double x = 0;
    double y = 0;
    double d = 0;
    std::memcpy(&x, raw_a.data() + 1 + i * 8, 8);
    std::memcpy(&y, raw_b.data() + 1 + i * 8, 8);
    std::memcpy(&d, again[0].bytes.data() + i * 8, 8);
    CHECK(d == x - y);
    float f = 0;
    std::memcpy(&f, again[1].bytes.data() + i * 4, 4);
    CHECK(f == fa[i] - fb[i]);
  }
  auto copy = copy_tensors(after);
  const std::byte* copy_buffer = copy[0].bytes.data();
  const auto copy_again = copy_tensors(before, std::move(copy));
  CHECK(copy_again[0].bytes.data() == copy_buffer);
  CHECK(std::equal(copy_again[0].bytes.begin(), copy_again[0].bytes.end(), raw_b.begin() + 1));
  CHECK(copy_again[1].name == "f");
}

TEST_SUITE_END();
