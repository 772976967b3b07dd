// SPDX-License-Identifier: Apache-2.0
#include "cmd/model_io.hpp"

#include "cmd/common.hpp"
#include "core/format/model_spec.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <charconv>
#include <chrono>
#include <cmath>
#include <map>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

std::int64_t
numel(const std::vector<std::int64_t>& shape)
{
  std::int64_t n = 1;
  for (const auto d : shape) {
    n *= d;
  }
  return n;
}

std::string
required_meta(const core::Safetensors& st, const std::string& key, const std::string& what)
{
  auto v = st.meta(key);
  if (!v) {
    throw core::VerifyError("{}: no {} in its metadata; is it a model written by fedl?", what, key);
  }
  return *v;
}

// fedl.classes of a model file: a positive integer, else VerifyError.
std::int64_t
classes_of(const core::Safetensors& st, const std::string& what)
{
  const auto text = required_meta(st, "fedl.classes", what);
  std::int64_t classes = 0;
  const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), classes);
  if (ec != std::errc{} || p != text.data() + text.size() || classes < 1) {
    throw core::VerifyError("{}: fedl.classes is not a positive integer: {}", what, text);
  }
  return classes;
}

void
check_fits(const OpenedModel& m, const core::Dataset& data)
{
  if (numel(data.sample_shape) != numel(m.input_shape)) {
    throw core::Error("{} has samples of {} features (shape {}), but the model takes {} (shape {})",
                      data.source.string(), numel(data.sample_shape), data.shape_string(), numel(m.input_shape),
                      core::shape_to_string(m.input_shape));
  }
  if (m.classes > 0) {
    for (std::size_t i = 0; i < data.size(); ++i) {
      if (data.labels[i] >= m.classes) {
        throw core::Error("{}: label {} is outside the model's {} classes (0..{})", data.where(i), data.labels[i],
                          m.classes, m.classes - 1);
      }
    }
  }
}

} // namespace

void
check_model_source(const ModelSource& src)
{
  if (src.model && src.model_bytes) {
    throw core::UsageError("internal: a model source has both a file and bytes");
  }
  const bool has_file = src.model || src.model_bytes;
  if (has_file && src.arch) {
    throw core::UsageError("--model and --arch both name the model; give one (a model file knows its architecture)");
  }
  if (!has_file && !src.arch && !src.torchscript) {
    throw core::UsageError("no model: give --model FILE, --arch SPEC or --torchscript FILE");
  }
  if (src.classes && !src.arch) {
    throw core::UsageError("--classes applies to --arch only (other models know their classes)");
  }
  if (src.torchscript && src.arch) {
    throw core::UsageError("--torchscript and --arch both name the model; give one");
  }
}

std::string
finding_text(const nlohmann::json& f)
{
  // The names and the source file are the module's author's words: one line, no controls.
  const auto source = f.value("source", "");
  return fmt::format("{} in {}{}: {}", core::terminal_text(f.value("operator", "?")),
                     core::terminal_text(f.value("method", "?")),
                     source.empty() ? "" : " (" + core::terminal_text(source) + ")", f.value("reason", "?"));
}

core::ModelPolicy
ModulePolicy::parse(const std::string& name)
{
  if (const auto policy = core::model_policy_named(name)) {
    return *policy;
  }
  throw core::UsageError("--model-policy must be strict, inspect or pinned, not {}", core::quote_text(name));
}

void
ModulePolicy::check_file(const fs::path& module, const std::optional<std::string>& sha256) const
{
  if (kind == core::ModelPolicy::strict) {
    throw core::VerifyError("{} is a TorchScript module, and --model-policy strict trains fedl's own architectures "
                            "only; review it (fedl inspect {}) and use --model-policy inspect or pinned to train it",
                            module.string(), module.string());
  }
  if (kind == core::ModelPolicy::pinned) {
    const auto sha = sha256 ? *sha256 : core::file_sha256(module);
    if (!pin || sha != *pin) {
      throw core::VerifyError("{} is not the module pinned with --pin-model (its SHA-256 is {}, the pin {}): it was "
                              "changed; review it with fedl inspect {} before pinning it again",
                              module.string(), sha, pin.value_or("none"), module.string());
    }
  }
}

nlohmann::json
check_module(const backends::Backend& backend, const fs::path& path, const ModulePolicy& policy)
{
  // Inspected once per content in this process (a trainer opens the module for every task).
  static std::map<std::string, nlohmann::json> inspected;
  const auto sha = core::file_sha256(path);
  policy.check_file(path, sha);
  auto it = inspected.find(sha);
  if (it == inspected.end()) {
    const auto start = std::chrono::steady_clock::now();
    it = inspected.emplace(sha, nlohmann::json::parse(backends::inspect_torchscript(backend, path))).first;
    FEDL_LOG_DEBUG("{}: inspected in {:.1f} ms ({} methods)", path.string(),
                   std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count(),
                   it->second.at("methods").size());
  }
  const auto& report = it->second;
  const auto& refused = report.at("refused");
  if (!refused.empty()) {
    throw core::VerifyError(
      "{} is refused by fedl's TorchScript allow-list (version {}): {}{}", path.string(),
      report.value("allow_list_version", 0), finding_text(refused.at(0)),
      refused.size() > 1 ? fmt::format("; and {} more (fedl inspect {} lists them)", refused.size() - 1, path.string())
                         : std::string());
  }
  return report;
}

OpenedModel
open_model(const backends::Backend& backend, const std::string& device, const ModelSource& src,
           const core::Dataset& data, OpenedModel* previous)
{
  check_model_source(src);
  if (src.arch) {
    const auto spec = core::parse_model_spec(*src.arch);
    spec.check_input(data.sample_shape);
    const auto classes = src.classes.value_or(data.num_classes());
    if (classes < 2 && !src.classes) {
      throw core::Error("{}: all labels are {}; a classifier needs at least two classes (or give --classes K)",
                        data.source.string(), classes - 1);
    }
    // Never reused: a fresh model's weights come from the seed, which `previous` has spent.
    OpenedModel m{backends::Model::create(backend, device, spec.text, data.sample_shape, classes, src.seed),
                  spec.text,
                  data.sample_shape,
                  classes,
                  std::nullopt,
                  {}};
    check_fits(m, data);
    return m;
  }

  // The model file: mapped from disk, or parsed in place from the caller's bytes.
  std::optional<core::SafetensorsFile> file;
  std::optional<core::Safetensors> parsed;
  std::string what;
  std::string sha256;
  if (src.model) {
    file.emplace(*src.model);
    what = src.model->string();
    sha256 = file->sha256();
  } else if (src.model_bytes) {
    what = src.model_bytes->what;
    parsed = core::parse_safetensors(src.model_bytes->bytes, what);
    sha256 = src.model_bytes->sha256 ? *src.model_bytes->sha256 : core::sha256_hex(src.model_bytes->bytes);
  }
  const core::Safetensors* st = file ? &file->content() : parsed ? &*parsed : nullptr;
  if (st != nullptr) {
    const auto kind = st->meta("fedl.kind");
    if (kind && *kind != "model") {
      throw core::UsageError("{} is a fedl {}, not a model; give a model file (fedl train --save-model, "
                             "fedl aggregate --out)",
                             what, *kind);
    }
  }

  if (src.torchscript) {
    const auto report = check_module(backend, *src.torchscript, src.policy);
    // Never reused: the TorchScript executor optimises a graph after its first runs, and the
    // optimised graph rounds differently, so a module trained twice in one process would not
    // give the update that fedl train gives.
    OpenedModel m{backends::Model::load_torchscript(backend, device, *src.torchscript),
                  "torchscript",
                  data.sample_shape,
                  0,
                  std::nullopt,
                  {}};
    for (const auto& f : report.at("needs_dp_off")) {
      m.needs_dp_off.push_back(finding_text(f));
    }
    if (st != nullptr) {
      m.model.set_weights(*st, what);
      m.file_sha256 = sha256;
      if (st->meta("fedl.classes")) {
        m.classes = classes_of(*st, what);
      }
    }
    check_fits(m, data);
    return m;
  }

  const auto arch = required_meta(*st, "fedl.arch", what);
  if (arch == "torchscript") {
    throw core::UsageError("{} holds the weights of a TorchScript model: give the module with --torchscript FILE",
                           what);
  }
  try {
    (void)core::parse_model_spec(arch);
  } catch (const core::UsageError& e) {
    throw core::VerifyError("{}: fedl.arch is not a valid architecture: {}", what, e.what());
  }
  std::vector<std::int64_t> input_shape;
  try {
    input_shape = core::parse_shape(required_meta(*st, "fedl.input_shape", what), "fedl.input_shape");
  } catch (const core::UsageError& e) {
    throw core::VerifyError("{}: {}", what, e.what());
  }
  const auto classes = classes_of(*st, what);
  // All its weights and buffers are overwritten below, so a model built the same way will do.
  const bool reuse = previous != nullptr && previous->arch == arch && previous->input_shape == input_shape &&
                     previous->classes == classes;
  OpenedModel m{reuse ? std::move(previous->model)
                      : backends::Model::create(backend, device, arch, input_shape, classes, src.seed),
                arch,
                input_shape,
                classes,
                sha256,
                {}};
  check_fits(m, data);
  m.model.set_weights(*st, what);
  return m;
}

core::Metadata
model_metadata(const OpenedModel& m, const std::string& kind)
{
  core::Metadata meta{
    {"fedl.kind", kind}, {"fedl.arch", m.arch}, {"fedl.input_shape", core::shape_to_string(m.input_shape)}};
  if (m.classes > 0) {
    meta["fedl.classes"] = std::to_string(m.classes);
  }
  return meta;
}

} // namespace fedl::cmd

namespace fedl::cmd {

fedl_train_config
train_config(const TrainingSettings& s, std::uint64_t seed)
{
  fedl_train_config c{};
  c.epochs = s.epochs;
  c.batch_size = s.batch_size;
  c.lr = s.lr;
  c.optimizer = s.optimizer == "adam" ? FEDL_OPT_ADAM : FEDL_OPT_SGD;
  c.momentum = s.momentum;
  c.prox_mu = s.prox_mu;
  c.seed = seed;
  if (s.dp) {
    c.dp_noise_multiplier = s.dp->noise_multiplier;
    c.dp_max_grad_norm = s.dp->max_grad_norm;
    c.dp_noise_seed = 0; // from the OS: the seed a coordinator sends must not predict the noise
  }
  return c;
}

UpdateBase
update_base(OpenedModel& m, UpdateBase spare)
{
  UpdateBase base{core::copy_tensors(m.model.weights(), std::move(spare.weights)), {}};
  base.sha256 =
    m.file_sha256 ? *m.file_sha256 : core::safetensors_sha256(core::views_of(base.weights), model_metadata(m, "model"));
  return base;
}

std::optional<core::DpSgdReport>
dp_plan(const TrainingSettings& settings, std::uint64_t samples)
{
  if (!settings.dp) {
    return std::nullopt;
  }
  const auto bs = std::max<std::uint64_t>(settings.batch_size, 1);
  const auto steps = static_cast<std::uint64_t>(settings.epochs) * ((samples + bs - 1) / bs);
  return core::dp_sgd_report(*settings.dp, samples, settings.batch_size, steps);
}

fedl_train_result
train_model(OpenedModel& m, const core::Dataset& data, const TrainingSettings& settings, std::uint64_t seed,
            const backends::Model::Progress& progress)
{
  if (settings.epochs == 0) {
    return {0.0, data.size(), 0, 0};
  }
  if (settings.dp && !m.needs_dp_off.empty()) {
    throw core::VerifyError("the TorchScript module cannot train under DP-SGD: {}", m.needs_dp_off.front());
  }
  const auto result = m.model.train(data, train_config(settings, seed), progress);
  // The privacy accounted is only true if the backend really took every step with DP-SGD.
  if (const auto dp = dp_plan(settings, data.size()); dp && result.dp_steps != dp->steps) {
    throw core::Error("the compute backend took {} of its {} steps with DP-SGD where {} were asked for and accounted; "
                      "it does not implement DP-SGD: train without DP or use a backend that does",
                      result.dp_steps, result.steps, dp->steps);
  }
  return result;
}

Update
make_update(OpenedModel& m, const UpdateBase& base, std::uint64_t num_samples, std::uint32_t epochs, double loss,
            const std::optional<core::DpSgdReport>& dp, std::vector<core::OwnedTensor> spare)
{
  Update u{core::weight_delta(m.model.weights(), core::views_of(base.weights), std::move(spare)),
           model_metadata(m, "update")};
  u.metadata["fedl.base_sha256"] = base.sha256;
  u.metadata["fedl.num_samples"] = std::to_string(num_samples);
  u.metadata["fedl.epochs"] = std::to_string(epochs);
  if (dp) {
    // The training loss is computed on the private data without noise: under DP-SGD it stays
    // at the site.
    u.metadata["fedl.dp"] = dp->to_json().dump();
  } else {
    u.metadata["fedl.loss"] = fmt::format("{}", loss);
  }
  return u;
}

namespace {

core::ClassificationCounts
classification_counts(OpenedModel& m, const core::Dataset& data, std::uint32_t batch_size)
{
  if (m.classes <= 0) {
    throw core::UsageError("the model's class count is unknown, so its classification metrics cannot be computed");
  }
  core::ClassificationCounts counts(m.classes);
  const auto classes = static_cast<std::size_t>(m.classes);
  const std::size_t batch = std::max<std::size_t>(batch_size, 1);
  std::vector<float> probabilities;
  for (std::size_t first = 0; first < data.size(); first += batch) {
    const auto n = std::min(batch, data.size() - first);
    probabilities.resize(n * classes);
    m.model.predict(data, first, m.classes, probabilities);
    counts.add(probabilities, std::span(data.labels).subspan(first, n));
  }
  return counts;
}

} // namespace

core::EvalResult
evaluate_model(OpenedModel& m, const core::Dataset& data, std::uint32_t batch_size, core::MetricsSet set)
{
  const auto t0 = uptime_seconds();
  const auto r = m.model.evaluate(data, batch_size);
  core::EvalResult result{r.accuracy, r.loss, r.samples, 0, std::nullopt};
  if (set == core::MetricsSet::classification) {
    result.classification = classification_counts(m, data, batch_size);
  }
  result.seconds = uptime_seconds() - t0;
  return result;
}

std::string
metrics_text(const nlohmann::json& j)
{
  const auto value = [](const nlohmann::json& v, const char* fmt_spec) {
    return v.is_number() ? fmt::format(fmt::runtime(fmt_spec), v.get<double>()) : std::string("-");
  };
  std::string t = fmt::format("accuracy {:.4f}  loss {:.4f}  samples {}", j.at("accuracy").get<double>(),
                              j.at("loss").get<double>(), j.at("samples").get<std::uint64_t>());
  if (j.contains("macro_f1")) {
    t +=
      fmt::format("  macro F1 {}  weighted F1 {}", value(j["macro_f1"], "{:.4f}"), value(j["weighted_f1"], "{:.4f}"));
  }
  if (j.contains("roc_auc")) {
    t += fmt::format("  ROC AUC {}  sensitivity {}  specificity {}", value(j["roc_auc"], "{:.4f}"),
                     value(j["sensitivity"], "{:.4f}"), value(j["specificity"], "{:.4f}"));
  }
  t += "\n";
  if (j.contains("per_class")) {
    t += fmt::format("{:>8} {:>10} {:>10} {:>10} {:>10}\n", "class", "precision", "recall", "F1", "support");
    for (const auto& c : j["per_class"]) {
      t += fmt::format("{:>8} {:>10} {:>10} {:>10} {:>10}\n", c.at("class").get<std::int64_t>(),
                       value(c["precision"], "{:.4f}"), value(c["recall"], "{:.4f}"), value(c["f1"], "{:.4f}"),
                       c.at("support").get<std::uint64_t>());
    }
  }
  return t;
}

} // namespace fedl::cmd
