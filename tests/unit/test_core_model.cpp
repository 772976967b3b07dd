// SPDX-License-Identifier: Apache-2.0
#include "core/format/model_spec.hpp"
#include "core/format/tensor.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

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

TEST_SUITE_END();
