// SPDX-License-Identifier: Apache-2.0
// Where `train`, `eval` and the `__worker` child get their model: a fedl model file (safetensors
// carrying fedl.arch, fedl.input_shape and fedl.classes) on disk or received in memory, a zoo
// spec, or a TorchScript module (with or without weights from a model file); how a model file is
// written; and the training run and update that `train` and `__worker` share.
#pragma once

#include "backends/loader.hpp"
#include "core/config/config.hpp"
#include "core/format/dataset.hpp"
#include "core/format/safetensors.hpp"
#include "core/format/tensor.hpp"
#include "core/math/metrics.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/model_policy.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace fedl::cmd {

// A fedl model file's bytes held in memory (a frame's body) instead of a --model path.
struct ModelBytes
{
  std::span<const std::byte> bytes; // must outlive the opened model's use of it
  std::string what;                 // names it in errors, e.g. "the round 3 model"
  // The bytes' SHA-256 if the sender already knows it (the coordinator sends it with a task), so
  // that a large model is not hashed again at every site. A wrong one only makes the update's
  // fedl.base_sha256 wrong, which the coordinator then rejects.
  std::optional<std::string> sha256;
};

// What a site accepts of a TorchScript module (fedl-join(1) --model-policy; every other
// command inspects): a module is always checked against the backend's operator allow-list
// before anything of it runs (fedl-inspect(1)); strict refuses TorchScript altogether, pinned
// takes only the module file whose SHA-256 is `pin`.
struct ModulePolicy
{
  core::ModelPolicy kind = core::ModelPolicy::inspect;
  std::optional<std::string> pin;

  static core::ModelPolicy parse(const std::string& name); // UsageError if unknown
  // Pure checks of the module file, which need no backend: strict and the pin. VerifyError.
  // `sha256`: the file's, if the caller has it already.
  void check_file(const std::filesystem::path& module, const std::optional<std::string>& sha256 = std::nullopt) const;
};

// The inspection of the module at `path` under `policy`: check_file, then the backend's report,
// which must find nothing to refuse (VerifyError, exit 3, naming the operator, the method and
// where in the source). Returns the report. A process that loads the same module again (a
// trainer, for every task) inspects it once.
nlohmann::json check_module(const backends::Backend& backend, const std::filesystem::path& path,
                            const ModulePolicy& policy);
// One finding of the report ("refused" or "needs_dp_off"), on one line: "aten::copy_ in
// __torch__.Net.forward (net.py:12:8): why", the module author's names escaped.
std::string finding_text(const nlohmann::json& finding);

struct ModelSource
{
  std::optional<std::filesystem::path> model;       // --model
  std::optional<ModelBytes> model_bytes;            // in place of --model
  std::optional<std::string> arch;                  // --arch
  std::optional<std::filesystem::path> torchscript; // --torchscript
  std::optional<std::int64_t> classes;              // --classes (with --arch)
  std::uint64_t seed = 0;
  ModulePolicy policy; // for --torchscript
};

// The flags that name the model: exactly one way, and --classes only with --arch (UsageError).
// open_model checks them too; a command calls this first so that a conflict is reported before
// the data loads.
void check_model_source(const ModelSource& src);

struct OpenedModel
{
  backends::Model model;
  std::string arch; // zoo spec, or "torchscript"
  std::vector<std::int64_t> input_shape;
  std::int64_t classes = 0;               // 0: unknown (TorchScript without a model file)
  std::optional<std::string> file_sha256; // of the model file's bytes (--model or model_bytes)
  // A TorchScript module's writes to its buffers' running statistics (BatchNorm), which it may
  // make without DP-SGD only: the inspection's reasons, empty if none.
  std::vector<std::string> needs_dp_off;
};

// Opens the model on `device` of `backend` and checks that `data` fits it (feature count,
// labels below the class count, naming the first offending line). Throws UsageError for
// contradictory sources, VerifyError for a model file that is not a fedl model.
//
// `previous`, a model opened before on the same backend and device, is taken over (left
// moved-from) when the new one is a zoo model from a model file with the same architecture, input
// shape and classes, so a process that trains round after round loads only the weights instead
// of building the model again (its weights and buffers are all overwritten, so the result is the
// same as a fresh model's). The caller drops `previous` afterwards either way.
OpenedModel open_model(const backends::Backend& backend, const std::string& device, const ModelSource& source,
                       const core::Dataset& data, OpenedModel* previous = nullptr);

// The metadata every fedl model and update carries.
core::Metadata model_metadata(const OpenedModel& m, const std::string& kind);

// Hyperparameters of one local training run (fedl train's options, a round's "training").
using TrainingSettings = core::TrainingConfig;
// The backend's form of them.
fedl_train_config train_config(const TrainingSettings& settings, std::uint64_t seed);

// Forward passes per batch when evaluating (fedl eval's default --batch-size).
inline constexpr std::uint32_t default_eval_batch_size = 1024;

// `m` on `data`, `batch_size` samples at a time (fedl eval, serve's evaluator, a site's
// --eval-data): accuracy, loss, samples, the seconds it took and, with `set` classification, the
// confusion matrix (and for two classes the ROC AUC) from the model's class probabilities, a
// second pass over the data. Throws UsageError if the model's class count is unknown or out of
// range, Error if the backend gives no probabilities.
core::EvalResult evaluate_model(OpenedModel& m, const core::Dataset& data, std::uint32_t batch_size,
                                core::MetricsSet set);
// The text of an evaluation's summary (core::EvalResult::summary) for a person: one line, then a
// line per class.
std::string metrics_text(const nlohmann::json& metrics);

// The weights an update is taken against: a copy of the model's weights before training, and the
// SHA-256 that names them: the model file's bytes, or for a fresh model the file that
// --save-model with --epochs 0 would write (the same seed makes the same bytes).
struct UpdateBase
{
  std::vector<core::OwnedTensor> weights;
  std::string sha256;
};
// `spare`: an earlier UpdateBase whose buffers are reused (fedl join's trainer, round after round).
UpdateBase update_base(OpenedModel& m, UpdateBase spare = {});

// With DP-SGD in `settings`: what training on `samples` examples will spend (q = batch size /
// samples, epochs × ceil(samples / batch size) steps). UsageError if the batch size exceeds the
// samples. Without: nullopt.
std::optional<core::DpSgdReport> dp_plan(const TrainingSettings& settings, std::uint64_t samples);

// Trains `m` on `data` (nothing with 0 epochs: loss 0, 0 steps). `progress` as Model::train.
fedl_train_result train_model(OpenedModel& m, const core::Dataset& data, const TrainingSettings& settings,
                              std::uint64_t seed, const backends::Model::Progress& progress);

// An update: trained minus base weights, with the metadata fedl train --out writes before it
// signs (kind, arch, input shape, classes, base_sha256, num_samples, epochs, and loss; or, when
// trained with DP-SGD, fedl.dp, the DP-SGD report as JSON, in place of the loss, which was
// computed on the private data without noise).
struct Update
{
  std::vector<core::OwnedTensor> tensors;
  core::Metadata metadata;

  std::vector<core::TensorView> views() const { return core::views_of(tensors); }
};
// `spare`: the tensors of an earlier update, whose buffers are reused.
Update make_update(OpenedModel& m, const UpdateBase& base, std::uint64_t num_samples, std::uint32_t epochs, double loss,
                   const std::optional<core::DpSgdReport>& dp, std::vector<core::OwnedTensor> spare = {});

} // namespace fedl::cmd
