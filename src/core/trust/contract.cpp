// SPDX-License-Identifier: Apache-2.0
#include "core/trust/contract.hpp"

#include "core/format/dataset.hpp"
#include "core/trust/ledger.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using json = nlohmann::json;

// Room for a model file's header beyond its tensors' bytes: fedl writes about 100 bytes per
// tensor and a few hundred of metadata.
constexpr std::uint64_t header_allowance = std::uint64_t{1} << 20;
constexpr std::uint64_t header_allowance_per_tensor = 1024;
// join.json is small; anything larger is not one.
constexpr std::size_t max_join_bytes = std::size_t{4} << 20;
constexpr std::size_t max_join_nesting = 8;

std::string
tensor_text(const TensorSpec& t)
{
  return fmt::format("{} {} [{}]", t.name, dtype_name(t.dtype), fmt::join(t.shape, ","));
}

// A model's tensors as a contract lists them: name, dtype and shape, in name order.
std::vector<TensorSpec>
specs_of(const Safetensors& model)
{
  std::vector<TensorSpec> out;
  for (const auto& t : model.tensors) {
    out.push_back({t.name, t.dtype, t.shape});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

template<typename T>
T
field(const json& j, const char* key, const std::string& what)
{
  const auto it = j.find(key);
  if (it == j.end()) {
    throw UsageError("{}: contract.{} is missing", what, key);
  }
  try {
    if constexpr (std::is_integral_v<T>) {
      if (!it->is_number_integer() || (std::is_unsigned_v<T> && !it->is_number_unsigned())) {
        throw UsageError("not an integer");
      }
      const auto v = it->get<std::int64_t>();
      if (it->is_number_unsigned() ? it->get<std::uint64_t>() > std::numeric_limits<T>::max()
                                   : v < static_cast<std::int64_t>(std::numeric_limits<T>::min())) {
        throw UsageError("out of range");
      }
      return it->get<T>();
    } else {
      return it->get<T>();
    }
  } catch (const std::exception&) {
    throw UsageError("{}: contract.{} is not a valid value: {}", what, key, quote_text(it->dump()));
  }
}

} // namespace

std::string_view
reason_class_name(ReasonClass c) noexcept
{
  switch (c) {
  case ReasonClass::bad_model:
    return "bad-model";
  case ReasonClass::bad_settings:
    return "bad-settings";
  case ReasonClass::data_mismatch:
    return "data-mismatch";
  case ReasonClass::budget:
    return "budget";
  case ReasonClass::internal:
    break;
  }
  return "internal";
}

std::string_view
reason_class_text(ReasonClass c) noexcept
{
  switch (c) {
  case ReasonClass::bad_model:
    return "the site cannot use the task's model";
  case ReasonClass::bad_settings:
    return "the task's training settings are outside what the site accepts";
  case ReasonClass::data_mismatch:
    return "the task's model does not fit the site's data";
  case ReasonClass::budget:
    return "the task would take the site past its privacy budget";
  case ReasonClass::internal:
    break;
  }
  return "the site could not train";
}

ReasonClass
reason_class_from_name(std::string_view name) noexcept
{
  for (const auto c :
       {ReasonClass::bad_model, ReasonClass::bad_settings, ReasonClass::data_mismatch, ReasonClass::budget}) {
    if (name == reason_class_name(c)) {
      return c;
    }
  }
  return ReasonClass::internal;
}

std::uint64_t
SiteContract::max_model_bytes() const
{
  std::uint64_t payload = 0;
  for (const auto& t : tensors) {
    std::uint64_t n = dtype_size(t.dtype);
    for (const auto d : t.shape) {
      n *= static_cast<std::uint64_t>(d);
    }
    payload += n;
  }
  return 8 + header_allowance + header_allowance_per_tensor * tensors.size() + payload;
}

json
SiteContract::to_json() const
{
  json t = json::array();
  for (const auto& x : tensors) {
    t.push_back({{"name", x.name}, {"dtype", dtype_name(x.dtype)}, {"shape", x.shape}});
  }
  json j = {{"arch", arch}, {"input_shape", input_shape}, {"classes", classes},
            {"tensors", t}, {"max_epochs", max_epochs},   {"max_batch_size", max_batch_size}};
  if (torchscript_sha256) {
    j["torchscript_sha256"] = *torchscript_sha256;
  }
  if (min_dp) {
    j["dp"] = {{"min_noise_multiplier", min_dp->noise_multiplier},
               {"max_grad_norm", min_dp->max_grad_norm},
               {"max_delta", min_dp->delta}};
  }
  if (data) {
    j["data"] = data->to_json();
  }
  return j;
}

SiteContract
SiteContract::from_json(const json& j, const std::string& what)
{
  if (!j.is_object()) {
    throw UsageError("{}: contract is not a JSON object", what);
  }
  for (const auto& [k, v] : j.items()) {
    static const std::vector<std::string> known{
      "arch", "input_shape", "classes", "tensors", "max_epochs", "max_batch_size", "dp", "data", "torchscript_sha256"};
    if (std::find(known.begin(), known.end(), k) == known.end()) {
      throw UsageError("{}: unknown key contract.{} (this fedl knows {})", what, quote_text(k), fmt::join(known, ", "));
    }
  }
  SiteContract c;
  c.arch = field<std::string>(j, "arch", what);
  c.input_shape = field<std::string>(j, "input_shape", what);
  c.classes = field<std::int64_t>(j, "classes", what);
  c.max_epochs = field<std::uint32_t>(j, "max_epochs", what);
  c.max_batch_size = field<std::uint32_t>(j, "max_batch_size", what);
  if (j.contains("torchscript_sha256")) {
    c.torchscript_sha256 = field<std::string>(j, "torchscript_sha256", what);
  }
  const auto& tensors = j.find("tensors");
  if (tensors == j.end() || !tensors->is_array()) {
    throw UsageError("{}: contract.tensors is missing or not a list", what);
  }
  for (const auto& t : *tensors) {
    TensorSpec s;
    const auto dtype = t.is_object() && t.contains("dtype") && t["dtype"].is_string()
                         ? dtype_from_name(t["dtype"].get<std::string>())
                         : std::nullopt;
    if (!dtype || !t.contains("name") || !t["name"].is_string() || !t.contains("shape") || !t["shape"].is_array()) {
      throw UsageError("{}: contract.tensors has an entry that is not {{name, dtype, shape}}: {}", what,
                       quote_text(t.dump()));
    }
    s.name = t["name"].get<std::string>();
    s.dtype = *dtype;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0 || d.get<std::int64_t>() > (std::int64_t{1} << 40)) {
        throw UsageError("{}: contract.tensors: {} has a bad shape", what, quote_text(s.name));
      }
      s.shape.push_back(d.get<std::int64_t>());
    }
    c.tensors.push_back(std::move(s));
  }
  if (const auto it = j.find("dp"); it != j.end()) {
    if (!it->is_object()) {
      throw UsageError("{}: contract.dp is not a JSON object", what);
    }
    DpSgdConfig dp;
    dp.noise_multiplier = field<double>(*it, "min_noise_multiplier", what);
    dp.max_grad_norm = field<double>(*it, "max_grad_norm", what);
    dp.delta = field<double>(*it, "max_delta", what);
    check_dp(dp.noise_multiplier, dp.max_grad_norm, dp.delta,
             {"contract.dp.min_noise_multiplier", "contract.dp.max_grad_norm", "contract.dp.max_delta"});
    c.min_dp = dp;
  }
  if (const auto it = j.find("data"); it != j.end()) {
    c.data = DataContract::from_json(*it, what + ": contract");
  }
  return c;
}

SiteContract
make_contract(const FederationConfig& config, const Safetensors& initial, std::optional<std::string> torchscript_sha256)
{
  SiteContract c;
  c.torchscript_sha256 = std::move(torchscript_sha256);
  c.arch = config.model.arch;
  c.input_shape = shape_to_string(config.model.input_shape);
  c.classes = config.model.classes;
  c.tensors = specs_of(initial);
  c.max_epochs = config.training.epochs;
  c.max_batch_size = config.training.batch_size;
  c.min_dp = config.training.dp;
  c.data = config.data;
  return c;
}

void
check_task_training(const SiteContract& c, const TrainingConfig& t)
{
  if (t.epochs > c.max_epochs) {
    throw UsageError("{} epochs, more than the {} this site accepts", t.epochs, c.max_epochs);
  }
  if (t.batch_size > c.max_batch_size) {
    throw UsageError("batch size {}, larger than the {} this site accepts", t.batch_size, c.max_batch_size);
  }
  if (!c.min_dp) {
    return;
  }
  if (!t.dp) {
    throw UsageError("training without DP-SGD, where this site requires noise multiplier {:g} or more",
                     c.min_dp->noise_multiplier);
  }
  if (t.dp->noise_multiplier < c.min_dp->noise_multiplier) {
    throw UsageError("DP-SGD noise multiplier {:g}, below the {:g} this site requires", t.dp->noise_multiplier,
                     c.min_dp->noise_multiplier);
  }
  if (t.dp->max_grad_norm > c.min_dp->max_grad_norm) {
    throw UsageError("DP-SGD clip norm {:g}, above the {:g} this site accepts", t.dp->max_grad_norm,
                     c.min_dp->max_grad_norm);
  }
  if (t.dp->delta > c.min_dp->delta) {
    throw UsageError("DP-SGD delta {:g}, above the {:g} this site accepts", t.dp->delta, c.min_dp->delta);
  }
}

void
check_task_model(const SiteContract& c, const Safetensors& m)
{
  const auto expect = [&](const char* key, const std::string& want) {
    const auto have = m.meta(key);
    if (!have || *have != want) {
      throw VerifyError("{} is {}, this site's contract says {}", key,
                        have ? quote_text(*have) : std::string("missing"), want);
    }
  };
  expect("fedl.kind", "model");
  expect("fedl.arch", c.arch);
  expect("fedl.input_shape", c.input_shape);
  expect("fedl.classes", std::to_string(c.classes));
  if (c.tensors.empty()) {
    return; // a contract that lists no tensors (none of fedl's) leaves them to the trainer
  }
  const auto have = specs_of(m);
  if (have == c.tensors) {
    return;
  }
  for (const auto& want : c.tensors) {
    const auto it = std::find_if(have.begin(), have.end(), [&](const auto& t) { return t.name == want.name; });
    if (it == have.end()) {
      throw VerifyError("no tensor {}", quote_text(want.name));
    }
    if (!(*it == want)) {
      throw VerifyError("tensor {}, this site's contract says {}", quote_text(tensor_text(*it)), tensor_text(want));
    }
  }
  throw VerifyError("{} tensors, this site's contract lists {}", have.size(), c.tensors.size());
}

json
sign_join(json join, const Identity& ca)
{
  join.erase("signature");
  const auto payload = canonical_json(join);
  join["signature"] = sign(ca.key, as_bytes(payload));
  return join;
}

JoinFile
read_join(const fs::path& bundle, const Cert& ca)
{
  const auto path = bundle / "join.json";
  const auto bytes = read_maybe_gzip(path, max_join_bytes);
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  json j;
  if (json_nesting(text) <= max_join_nesting) {
    j = json::parse(text.begin(), text.end(), nullptr, false);
  }
  if (j.is_discarded() || !j.is_object() || !j.value("server", json()).is_string() ||
      !j.value("server_name", json()).is_string()) {
    throw UsageError("{}: not valid JSON with string fields server and server_name", path.string());
  }
  const auto altered = [&](const std::string& what) {
    return VerifyError("{}: {}: the bundle was altered after fedl init made it; ask the operator for a new one",
                       path.string(), what);
  };
  const auto sig = j.find("signature");
  if (sig == j.end()) {
    if (j.contains("contract")) {
      throw altered("it has a contract but no signature");
    }
    return {j, std::nullopt};
  }
  auto rest = j;
  rest.erase("signature");
  if (!sig->is_string() || !verify_signature(ca, as_bytes(canonical_json(rest)), sig->get<std::string>())) {
    throw altered(fmt::format("not signed by the federation's CA ({})", (bundle / "ca.crt").string()));
  }
  if (!j.contains("contract")) {
    return {j, std::nullopt};
  }
  auto contract = SiteContract::from_json(j["contract"], path.string());
  if (contract.torchscript_sha256) {
    const auto module = bundle / "model.pt";
    if (!fs::exists(module) || file_sha256(module) != *contract.torchscript_sha256) {
      throw altered(fmt::format("{} is missing, or not the TorchScript module the contract names", module.string()));
    }
  }
  return {j, std::move(contract)};
}

} // namespace fedl::core
