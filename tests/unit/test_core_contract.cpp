// SPDX-License-Identifier: Apache-2.0
// A site's contract (core/contract): cut from the federation's config and first model, written
// into join.json and signed by the CA; tasks outside it refused with what differs.
#include "core/trust/contract.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <vector>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

// A model file's parsed content: mlp:4 on 3 features and 2 classes, as fedl writes it.
struct Model
{
  std::vector<float> w0 = std::vector<float>(12), b0 = std::vector<float>(4), w1 = std::vector<float>(8),
                     b1 = std::vector<float>(2);
  Safetensors st;

  Model()
  {
    const auto view = [](const char* name, std::vector<std::int64_t> shape, const std::vector<float>& v) {
      return TensorView{name, DType::f32, std::move(shape), std::as_bytes(std::span(v))};
    };
    st.tensors = {view("layers.2.weight", {2, 4}, w1), view("layers.0.weight", {4, 3}, w0),
                  view("layers.0.bias", {4}, b0), view("layers.2.bias", {2}, b1)};
    st.metadata = {{"fedl.kind", "model"}, {"fedl.arch", "mlp:4"}, {"fedl.input_shape", "3"}, {"fedl.classes", "2"}};
  }
};

FederationConfig
config()
{
  FederationConfig c;
  c.model.arch = "mlp:4";
  c.model.input_shape = {3};
  c.model.classes = 2;
  c.training.epochs = 3;
  c.training.batch_size = 16;
  c.training.dp = DpSgdConfig{1.1, 1.0, 1e-5};
  return c;
}

} // namespace

TEST_SUITE_BEGIN("contract");

TEST_CASE("contract: cut from the config and the first model, and read back from its JSON")
{
  const Model m;
  const auto c = make_contract(config(), m.st, std::nullopt);
  CHECK(c.arch == "mlp:4");
  CHECK(c.input_shape == "3");
  CHECK(c.classes == 2);
  REQUIRE(c.tensors.size() == 4);
  CHECK(c.tensors.front().name == "layers.0.bias"); // name order
  CHECK(c.max_epochs == 3);
  CHECK(c.max_batch_size == 16);
  REQUIRE(c.min_dp);
  CHECK(c.min_dp->noise_multiplier == 1.1);
  // 26 floats, the size prefix, and the header allowance (1 MiB + 1 KiB per tensor).
  CHECK(c.max_model_bytes() == 26 * 4 + 8 + (1 << 20) + 4 * 1024);

  const auto back = SiteContract::from_json(c.to_json(), "join.json");
  CHECK(back.to_json() == c.to_json());
  CHECK(back.tensors == c.tensors);
  CHECK_FALSE(c.data);
  CHECK_FALSE(c.to_json().contains("data"));

  // The federation's data contract travels in the site's.
  auto with_data = config();
  with_data.data = DataContract{DataFormat::csv, true, "y", {"a", "b", "c", "y"}};
  const auto cd = make_contract(with_data, m.st, std::nullopt);
  REQUIRE(cd.data);
  CHECK(*cd.data == *with_data.data);
  CHECK(SiteContract::from_json(cd.to_json(), "join.json").data == cd.data);
  auto bad = cd.to_json();
  bad["data"]["format"] = "xml";
  CHECK_THROWS_WITH_AS(SiteContract::from_json(bad, "join.json"), doctest::Contains("data.format"), UsageError);

  auto j = c.to_json();
  j["surprise"] = 1;
  CHECK_THROWS_WITH_AS(SiteContract::from_json(j, "join.json"), doctest::Contains("unknown key contract.'surprise'"),
                       UsageError);
  j = c.to_json();
  j["max_epochs"] = -1;
  CHECK_THROWS_WITH_AS(SiteContract::from_json(j, "join.json"), doctest::Contains("contract.max_epochs"), UsageError);
  j = c.to_json();
  j["tensors"][0]["dtype"] = "F13";
  CHECK_THROWS_AS(SiteContract::from_json(j, "join.json"), UsageError);
  j = c.to_json();
  j["dp"]["min_noise_multiplier"] = 0;
  CHECK_THROWS_AS(SiteContract::from_json(j, "join.json"), UsageError);
}

TEST_CASE("contract: training settings within it pass, each one outside it is named")
{
  const Model m;
  const auto c = make_contract(config(), m.st, std::nullopt);
  auto t = config().training;
  CHECK_NOTHROW(check_task_training(c, t));
  t.epochs = 2; // fewer epochs, more noise, a smaller clip and delta: all tighter
  t.dp->noise_multiplier = 2;
  t.dp->max_grad_norm = 0.5;
  t.dp->delta = 1e-6;
  CHECK_NOTHROW(check_task_training(c, t));

  const auto refused = [&](auto change, const char* text) {
    auto x = config().training;
    change(x);
    CHECK_THROWS_WITH_AS(check_task_training(c, x), doctest::Contains(text), UsageError);
  };
  refused([](auto& x) { x.epochs = 4; }, "4 epochs, more than the 3");
  refused([](auto& x) { x.batch_size = 17; }, "batch size 17");
  refused([](auto& x) { x.dp.reset(); }, "without DP-SGD");
  refused([](auto& x) { x.dp->noise_multiplier = 1e-9; }, "noise multiplier 1e-09, below the 1.1");
  refused([](auto& x) { x.dp->max_grad_norm = 2; }, "clip norm 2");
  refused([](auto& x) { x.dp->delta = 0.9; }, "delta 0.9");

  auto open = config();
  open.training.dp.reset();
  const auto no_dp = make_contract(open, m.st, std::nullopt);
  CHECK_NOTHROW(check_task_training(no_dp, open.training));
  CHECK_NOTHROW(check_task_training(no_dp, config().training)); // DP-SGD is always welcome
}

TEST_CASE("contract: a model that differs in metadata or tensors is refused with the difference")
{
  const Model m;
  const auto c = make_contract(config(), m.st, std::nullopt);
  CHECK_NOTHROW(check_task_model(c, m.st));

  const auto refused = [&](auto change, const char* text) {
    Model x;
    change(x.st);
    CHECK_THROWS_WITH_AS(check_task_model(c, x.st), doctest::Contains(text), VerifyError);
  };
  refused([](auto& st) { st.metadata["fedl.arch"] = "mlp:1024,1024"; },
          "fedl.arch is 'mlp:1024,1024', this site's contract says mlp:4");
  refused([](auto& st) { st.metadata["fedl.classes"] = "16777216"; }, "fedl.classes is '16777216'");
  refused([](auto& st) { st.metadata.erase("fedl.input_shape"); }, "fedl.input_shape is missing");
  refused([](auto& st) { st.metadata["fedl.kind"] = "update"; }, "fedl.kind");
  refused([](auto& st) { st.tensors.clear(); }, "no tensor 'layers.0.bias'");
  refused([](auto& st) { st.tensors[1].shape = {4, 4}; }, "tensor 'layers.0.weight F32 [4,4]'");
  refused([](auto& st) { st.tensors[2].dtype = DType::f64; }, "layers.0.bias F64");
  refused([](auto& st) { st.tensors.push_back(st.tensors[0]), st.tensors.back().name = "extra"; }, "5 tensors");
}

TEST_CASE("contract: join.json signed by the CA verifies, and any change to it does not")
{
  const TempDir dir;
  const auto ca = create_ca("fedl federation CA test", {.days = 30});
  const auto other = create_ca("fedl federation CA other", {.days = 30});
  const Model m;
  const nlohmann::json join = {{"site", "site-1"},
                               {"server", "127.0.0.1:7443"},
                               {"server_name", "localhost"},
                               {"contract", make_contract(config(), m.st, std::nullopt).to_json()}};
  const auto write = [&](const nlohmann::json& j) { atomic_write(dir / "join.json", j.dump(2)); };

  write(sign_join(join, ca));
  const auto read = read_join(dir.path(), ca.cert);
  REQUIRE(read.contract);
  CHECK(read.contract->to_json() == join["contract"]);
  CHECK(read.join["site"] == "site-1");

  auto altered = sign_join(join, ca);
  altered["contract"]["max_epochs"] = 100000;
  write(altered);
  CHECK_THROWS_WITH_AS(read_join(dir.path(), ca.cert), doctest::Contains("not signed by the federation's CA"),
                       VerifyError);

  write(sign_join(join, other));
  CHECK_THROWS_AS(read_join(dir.path(), ca.cert), VerifyError);

  write(join); // the signature removed
  CHECK_THROWS_WITH_AS(read_join(dir.path(), ca.cert), doctest::Contains("a contract but no signature"), VerifyError);

  auto old = join; // an older fedl's bundle: neither contract nor signature
  old.erase("contract");
  write(old);
  CHECK_FALSE(read_join(dir.path(), ca.cert).contract);

  // A TorchScript bundle: its module must be the one the contract hashed.
  auto contract = make_contract(config(), m.st, fedl::core::sha256_hex(as_bytes("module")));
  auto ts = join;
  ts["contract"] = contract.to_json();
  write(sign_join(ts, ca));
  CHECK_THROWS_WITH_AS(read_join(dir.path(), ca.cert), doctest::Contains("model.pt is missing"), VerifyError);
  fedl::test::write_file(dir / "model.pt", "another module");
  CHECK_THROWS_AS(read_join(dir.path(), ca.cert), VerifyError);
  fedl::test::write_file(dir / "model.pt", "module");
  CHECK(read_join(dir.path(), ca.cert).contract->torchscript_sha256 == contract.torchscript_sha256);

  fedl::test::write_file(dir / "join.json", std::string(100, '[') + std::string(100, ']'));
  CHECK_THROWS_AS(read_join(dir.path(), ca.cert), UsageError);
}

TEST_CASE("contract: reason classes by name, and nothing else")
{
  for (const auto c : {ReasonClass::bad_model, ReasonClass::bad_settings, ReasonClass::data_mismatch,
                       ReasonClass::budget, ReasonClass::internal}) {
    CHECK(reason_class_from_name(reason_class_name(c)) == c);
    CHECK_FALSE(reason_class_text(c).empty());
  }
  CHECK(reason_class_from_name("line 4: label 3") == ReasonClass::internal);
}

TEST_CASE("contract: a task's training object is read strictly")
{
  CHECK(training_from_json({{"epochs", 2}, {"dp", {{"noise_multiplier", 1.0}, {"max_grad_norm", 1.0}}}}, "the task")
          .dp->noise_multiplier == 1.0);
  CHECK_THROWS_WITH_AS(training_from_json({{"shuffle", false}}, "the task"),
                       doctest::Contains("the task: unknown key training.shuffle"), UsageError);
  CHECK_THROWS_WITH_AS(training_from_json({{"epochs", 4294967297}}, "the task"), doctest::Contains("training.epochs"),
                       UsageError);
  CHECK_THROWS_WITH_AS(training_from_json({{"epochs", 100001}}, "the task"), doctest::Contains("over the limit"),
                       UsageError);
  CHECK_THROWS_AS(
    training_from_json({{"dp", {{"noise_multiplier", 1.0}, {"max_grad_norm", 1.0}, {"delta", 1.5}}}}, "the task"),
    UsageError);
}
