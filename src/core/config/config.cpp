// SPDX-License-Identifier: Apache-2.0
#include "core/config/config.hpp"

#include "core/format/dataset.hpp"
#include "core/math/accountant.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <fmt/ranges.h>

#include <cmath>
#include <limits>
#include <set>
#include <string_view>
#include <utility>

namespace fedl::core {

namespace {

using nlohmann::json;

constexpr std::size_t max_config_nesting = 8;

// Reads the fields of one JSON object, tracking which keys were used, so that the leftovers can
// be reported by name.
class ObjectReader
{
public:
  ObjectReader(const json& j, std::string path, const std::string& what) : m_j(j), m_path(std::move(path)), m_what(what)
  {
    if (!j.is_object()) {
      throw UsageError("{}: {} must be an object, found {}", what, m_path.empty() ? "the top level" : m_path,
                       j.type_name());
    }
  }

  std::string field(const std::string& key) const { return m_path.empty() ? key : m_path + "." + key; }

  const json* find(const std::string& key)
  {
    m_used.insert(key);
    const auto it = m_j.find(key);
    return it == m_j.end() ? nullptr : &*it;
  }

  const json& require(const std::string& key)
  {
    const auto* v = find(key);
    if (v == nullptr) {
      throw UsageError("{}: {} is missing", m_what, field(key));
    }
    return *v;
  }

  [[noreturn]] void type_error(const std::string& key, std::string_view expected, const json& v) const
  {
    throw UsageError("{}: {} must be {}, found {} {}", m_what, field(key), expected, v.type_name(), v.dump());
  }

  void get(const std::string& key, std::string& out)
  {
    if (const auto* v = find(key)) {
      if (!v->is_string()) {
        type_error(key, "a string", *v);
      }
      out = v->get<std::string>();
    }
  }

  void get(const std::string& key, double& out)
  {
    if (const auto* v = find(key)) {
      if (!v->is_number()) {
        type_error(key, "a number", *v);
      }
      out = v->get<double>();
    }
  }

  void get(const std::string& key, bool& out)
  {
    if (const auto* v = find(key)) {
      if (!v->is_boolean()) {
        type_error(key, "true or false", *v);
      }
      out = v->get<bool>();
    }
  }

  // An integer that T holds: get<T>() alone would cut 4294967297 to 1 for a uint32_t.
  template<typename T>
  requires(std::is_integral_v<T> && !std::is_same_v<T, bool>) void get(const std::string& key, T& out)
  {
    if (const auto* v = find(key)) {
      const char* kind = std::is_unsigned_v<T> ? "a non-negative integer" : "an integer";
      const bool negative = v->is_number_integer() && !v->is_number_unsigned() && v->get<std::int64_t>() < 0;
      if (!v->is_number_integer() || (std::is_unsigned_v<T> && negative)) {
        type_error(key, kind, *v);
      }
      const bool fits =
        v->is_number_unsigned() ? std::in_range<T>(v->get<std::uint64_t>()) : std::in_range<T>(v->get<std::int64_t>());
      if (!fits) {
        type_error(
          key, fmt::format("{} from {} to {}", kind, std::numeric_limits<T>::min(), std::numeric_limits<T>::max()), *v);
      }
      out = v->get<T>();
    }
  }

  void get(const std::string& key, std::vector<std::string>& out)
  {
    if (const auto* v = find(key)) {
      if (!v->is_array()) {
        type_error(key, "an array of strings", *v);
      }
      out.clear();
      for (const auto& item : *v) {
        if (!item.is_string()) {
          type_error(key, "an array of strings", *v);
        }
        out.push_back(item.get<std::string>());
      }
    }
  }

  // Throws for keys present in the object that nobody asked for.
  void finish() const
  {
    for (const auto& [k, v] : m_j.items()) {
      if (m_used.count(k) == 0) {
        std::vector<std::string> known(m_used.begin(), m_used.end());
        throw UsageError("{}: unknown key {} (known keys here: {})", m_what, field(k), fmt::join(known, ", "));
      }
    }
  }

private:
  const json& m_j;
  std::string m_path;
  const std::string& m_what;
  std::set<std::string> m_used;
};

} // namespace

nlohmann::json
to_json(const TrainingConfig& t)
{
  json j = {{"epochs", t.epochs},       {"batch_size", t.batch_size}, {"lr", t.lr},
            {"optimizer", t.optimizer}, {"momentum", t.momentum},     {"prox_mu", t.prox_mu}};
  if (t.dp) {
    j["dp"] = {
      {"noise_multiplier", t.dp->noise_multiplier}, {"max_grad_norm", t.dp->max_grad_norm}, {"delta", t.dp->delta}};
  }
  return j;
}

void
check_dp(double noise_multiplier, double clip, double delta, const DpFlagNames& names)
{
  if (!(noise_multiplier > 0) || !std::isfinite(noise_multiplier)) {
    throw UsageError("{} must be a positive number, not {}", names.noise_multiplier, noise_multiplier);
  }
  if (!(clip > 0) || !std::isfinite(clip)) {
    throw UsageError("{} must be a positive number, not {}", names.clip, clip);
  }
  if (!(delta > 0 && delta < 1)) {
    throw UsageError("{} must be between 0 and 1 (exclusive), not {}", names.delta, delta);
  }
  // An epsilon that does not fit a double could be neither recorded nor audited.
  if (!std::isfinite(compute_epsilon(1.0, noise_multiplier, 1, delta).epsilon)) {
    throw UsageError("{} {} is too small: one step would spend an infinite epsilon", names.noise_multiplier,
                     noise_multiplier);
  }
}

void
check_privacy(const PrivacyConfig& p, const PrivacyNames& names)
{
  if (!(p.delta > 0 && p.delta < 1)) {
    throw UsageError("{} must be between 0 and 1 (exclusive), not {}", names.delta, p.delta);
  }
  if (p.clip_norm != 0 || p.noise_multiplier != 0) {
    check_dp(p.noise_multiplier, p.clip_norm, p.delta, {names.noise_multiplier, names.clip_norm, names.delta});
  }
  if (p.max_epsilon != 0 && (!(p.max_epsilon > 0) || !std::isfinite(p.max_epsilon))) {
    throw UsageError("{} must be a positive number, not {}", names.max_epsilon, p.max_epsilon);
  }
  if (p.max_epsilon > 0 && p.noise_multiplier <= 0) {
    throw UsageError("{} budgets the federation's client-level DP: give {} C and {} S too (a site budgets its own "
                     "sample-level DP-SGD with fedl join --max-epsilon)",
                     names.max_epsilon, names.clip_norm, names.noise_multiplier);
  }
}

void
check_training(const TrainingConfig& t)
{
  if (t.epochs > TrainingConfig::max_epochs) {
    throw UsageError("epochs {} is over the limit of {}", t.epochs, TrainingConfig::max_epochs);
  }
  if (t.batch_size < 1 || t.batch_size > TrainingConfig::max_batch_size) {
    throw UsageError("batch_size {} is outside 1..{}", t.batch_size, TrainingConfig::max_batch_size);
  }
  if (!(t.lr > 0) || !std::isfinite(t.lr)) {
    throw UsageError("lr {} is not a positive number", t.lr);
  }
  if (t.optimizer != "sgd" && t.optimizer != "adam") {
    throw UsageError("optimizer '{}' is not one of sgd, adam", t.optimizer);
  }
  if (!(t.momentum >= 0 && t.momentum <= 1)) {
    throw UsageError("momentum {} is outside 0..1", t.momentum);
  }
  if (!(t.prox_mu >= 0) || !std::isfinite(t.prox_mu)) {
    throw UsageError("prox_mu {} is not a non-negative number", t.prox_mu);
  }
  if (t.dp) {
    check_dp(t.dp->noise_multiplier, t.dp->max_grad_norm, t.dp->delta,
             {"dp.noise_multiplier", "dp.max_grad_norm", "dp.delta"});
  }
}

void
check_limits(const LimitsConfig& limits, const char* norm, const char* samples)
{
  if (!(limits.max_update_norm > 0) || !std::isfinite(limits.max_update_norm)) {
    throw UsageError("{} must be a positive number, not {}", norm, limits.max_update_norm);
  }
  if (limits.max_num_samples == 0) {
    throw UsageError("{} must be a positive integer", samples);
  }
}

nlohmann::json
to_json(const PrivacyConfig& p)
{
  return {{"clip_norm", p.clip_norm},
          {"noise_multiplier", p.noise_multiplier},
          {"max_epsilon", p.max_epsilon},
          {"delta", p.delta},
          {"accountant", accountant_flag(p.accountant)}};
}

nlohmann::json
to_json(const ServerOptimizer& o)
{
  return {{"lr", o.lr}, {"momentum", o.momentum}, {"beta1", o.beta1}, {"beta2", o.beta2}, {"tau", o.tau}};
}

ServerOptimizer
server_optimizer_from_json(const json& j, const std::string& path, const std::string& what,
                           const std::vector<std::string>& also_allowed)
{
  ObjectReader r(j, path, what);
  ServerOptimizer o;
  for (const auto& [name, legacy, value] :
       {std::tuple{"lr", "server_lr", &o.lr}, std::tuple{"momentum", "server_momentum", &o.momentum}}) {
    if (j.contains(name) && j.contains(legacy)) {
      throw UsageError("{}: {} and {} are the same setting: give one", what, r.field(name), r.field(legacy));
    }
    r.get(legacy, *value);
    r.get(name, *value);
  }
  r.get("beta1", o.beta1);
  r.get("beta2", o.beta2);
  r.get("tau", o.tau);
  for (const auto& key : also_allowed) {
    (void)r.find(key);
  }
  r.finish();
  return o;
}

json
to_json(const FederationConfig& c)
{
  json model = {
    {"arch", c.model.arch}, {"input_shape", shape_to_string(c.model.input_shape)}, {"classes", c.model.classes}};
  if (c.model.torchscript) {
    model["torchscript"] = *c.model.torchscript;
  }
  json j = {
    {"version", c.version},
    {"model", model},
    {"clients", c.clients},
    {"server",
     {{"listen", c.listen},
      {"names", c.server_names},
      {"min_clients", c.min_clients},
      {"clients_per_round", c.clients_per_round},
      {"round_timeout", c.round_timeout},
      {"wait_timeout", c.wait_timeout}}},
    {"rounds", c.rounds},
    {"strategy", c.strategy},
    {"server_optimizer", to_json(c.server_optimizer)},
    {"training", to_json(c.training)},
    {"seed", c.seed},
    {"pki", {{"valid_days", c.valid_days}}},
    {"limits", {{"max_update_norm", c.limits.max_update_norm}, {"max_num_samples", c.limits.max_num_samples}}},
  };
  // Written only when set, so that the files of federations without it stay as they were.
  if (c.privacy != PrivacyConfig{}) {
    j["privacy"] = to_json(c.privacy);
  }
  if (c.secure_aggregation) {
    j["secure_aggregation"] = to_json(*c.secure_aggregation);
  }
  if (c.data) {
    j["data"] = c.data->to_json();
  }
  return j;
}

void
check_secure_aggregation(const SecureAggregationConfig& s, const SecureAggregationNames& names)
{
  const double t = s.threshold;
  if (!(t == 0 || (t > 0 && t < 1) || (t >= 2 && t <= 1e6 && t == std::floor(t)))) {
    throw UsageError("{} must be a fraction of the sites asked (between 0 and 1) or a whole number of sites, at "
                     "least 2; not {}",
                     names.threshold, t);
  }
  if (s.neighbours == 1 || s.neighbours > SecureAggregationConfig::max_neighbours) {
    throw UsageError("{} must be 2 to {} (or 0, the default), not {}", names.neighbours,
                     SecureAggregationConfig::max_neighbours, s.neighbours);
  }
  if (!(s.range > 0) || !std::isfinite(s.range)) {
    throw UsageError("{} must be a positive number, not {}", names.range, s.range);
  }
}

json
to_json(const SecureAggregationConfig& s)
{
  return {
    {"threshold", s.threshold}, {"neighbours", s.neighbours}, {"range", s.range}, {"distributed_dp", s.distributed_dp}};
}

void
check_site_name(const std::string& name)
{
  const bool ok =
    !name.empty() && name.size() <= 64 && name[0] != '.' && name[0] != '-' &&
    name.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == std::string::npos;
  if (!ok) {
    throw UsageError("site name '{}' is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with "
                     "'.' or '-'",
                     name);
  }
}

TrainingConfig
training_from_json(const nlohmann::json& t, const std::string& what)
{
  TrainingConfig c;
  ObjectReader r(t, "training", what);
  r.get("epochs", c.epochs);
  r.get("batch_size", c.batch_size);
  r.get("lr", c.lr);
  r.get("optimizer", c.optimizer);
  r.get("momentum", c.momentum);
  r.get("prox_mu", c.prox_mu);
  if (const auto* dp = r.find("dp")) {
    ObjectReader d(*dp, "training.dp", what);
    DpSgdConfig cfg;
    d.get("noise_multiplier", cfg.noise_multiplier);
    d.get("max_grad_norm", cfg.max_grad_norm);
    d.get("delta", cfg.delta);
    d.finish();
    c.dp = cfg;
  }
  r.finish();
  try {
    check_training(c);
  } catch (const UsageError& e) {
    throw UsageError("{}: training: {}", what, e.what());
  }
  return c;
}

namespace {

// fedl.json's "secure_aggregation", read and checked.
SecureAggregationConfig
secure_aggregation_from_json(const json& j, const std::string& what)
{
  ObjectReader r(j, "secure_aggregation", what);
  SecureAggregationConfig sa;
  r.get("threshold", sa.threshold);
  r.get("neighbours", sa.neighbours);
  r.get("range", sa.range);
  r.get("distributed_dp", sa.distributed_dp);
  r.finish();
  try {
    check_secure_aggregation(sa);
  } catch (const UsageError& e) {
    throw UsageError("{}: secure_aggregation: {}", what, e.what());
  }
  return sa;
}

} // namespace

FederationConfig
config_from_json(const nlohmann::json& j, const std::string& what)
{
  FederationConfig c;
  ObjectReader top(j, "", what);
  top.get("version", c.version);
  if (c.version != 1) {
    throw UsageError("{}: version {} is not supported by this fedl (it reads version 1)", what, c.version);
  }
  {
    ObjectReader m(top.require("model"), "model", what);
    m.get("arch", c.model.arch);
    std::string shape;
    m.get("input_shape", shape);
    c.model.input_shape = parse_shape(shape, what + ": model.input_shape");
    m.get("classes", c.model.classes);
    if (const auto* ts = m.find("torchscript")) {
      if (!ts->is_string()) {
        m.type_error("torchscript", "a string", *ts);
      }
      c.model.torchscript = ts->get<std::string>();
      const std::filesystem::path name(*c.model.torchscript);
      if (name.empty() || name != name.filename() || name == "." || name == "..") {
        throw UsageError("{}: model.torchscript must be a file name inside the workspace, not {}", what,
                         *c.model.torchscript);
      }
    }
    m.finish();
    if (c.model.arch.empty() || c.model.classes < 1) {
      throw UsageError("{}: model.arch and a positive model.classes are required", what);
    }
  }
  top.get("clients", c.clients);
  for (const auto& client : c.clients) {
    try {
      check_site_name(client);
    } catch (const UsageError& e) {
      throw UsageError("{}: clients: {}", what, e.what());
    }
  }
  if (const auto* s = top.find("server")) {
    ObjectReader r(*s, "server", what);
    r.get("listen", c.listen);
    r.get("names", c.server_names);
    r.get("min_clients", c.min_clients);
    r.get("clients_per_round", c.clients_per_round);
    r.get("round_timeout", c.round_timeout);
    r.get("wait_timeout", c.wait_timeout);
    r.finish();
    if (!(c.round_timeout > 0) || !(c.wait_timeout >= 0)) {
      throw UsageError("{}: server.round_timeout must be positive and server.wait_timeout not negative", what);
    }
  }
  top.get("rounds", c.rounds);
  top.get("strategy", c.strategy);
  if (const auto* s = top.find("server_optimizer")) {
    c.server_optimizer = server_optimizer_from_json(*s, "server_optimizer", what);
  }
  if (const auto* t = top.find("training")) {
    // Checked here, not where a site trains: a bad value would fail every attempt of every round.
    c.training = training_from_json(*t, what);
  }
  if (const auto* p = top.find("privacy")) {
    ObjectReader r(*p, "privacy", what);
    r.get("clip_norm", c.privacy.clip_norm);
    r.get("noise_multiplier", c.privacy.noise_multiplier);
    r.get("max_epsilon", c.privacy.max_epsilon);
    r.get("delta", c.privacy.delta);
    std::string accountant(accountant_flag(c.privacy.accountant));
    r.get("accountant", accountant);
    r.finish();
    try {
      c.privacy.accountant = accountant_from_flag(accountant, "privacy.accountant");
    } catch (const UsageError& e) {
      throw UsageError("{}: {}", what, e.what());
    }
    try {
      check_privacy(c.privacy);
    } catch (const UsageError& e) {
      throw UsageError("{}: privacy: {}", what, e.what());
    }
  }
  if (const auto* l = top.find("limits")) {
    ObjectReader r(*l, "limits", what);
    r.get("max_update_norm", c.limits.max_update_norm);
    r.get("max_num_samples", c.limits.max_num_samples);
    r.finish();
    try {
      check_limits(c.limits);
    } catch (const UsageError& e) {
      throw UsageError("{}: limits: {}", what, e.what());
    }
  }
  if (const auto* a = top.find("secure_aggregation")) {
    c.secure_aggregation = secure_aggregation_from_json(*a, what);
  }
  if (const auto* d = top.find("data")) {
    c.data = DataContract::from_json(*d, what);
  }
  top.get("seed", c.seed);
  if (const auto* p = top.find("pki")) {
    ObjectReader r(*p, "pki", what);
    r.get("valid_days", c.valid_days);
    r.finish();
  }
  top.finish();
  return c;
}

FederationConfig
load_config(const std::filesystem::path& path)
{
  const MappedFile file(path);
  const auto bytes = file.bytes();
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  // fedl.json nests 3 deep (server.names, training.dp). A deeper file is refused before it is
  // parsed: printing a value of a deep tree in an error message recursed once per level, and a
  // 400 KB file of brackets overflowed the stack.
  if (const auto depth = json_nesting(text); depth > max_config_nesting) {
    throw UsageError("{}: nests {} levels deep; fedl.json has 3", path.string(), depth);
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw UsageError("{}: not valid JSON: {}", path.string(), e.what());
  }
  return config_from_json(j, path.string());
}

std::string
config_text(const FederationConfig& config)
{
  return to_json(config).dump(2) + "\n";
}

} // namespace fedl::core
