// SPDX-License-Identifier: Apache-2.0
// Where `train` and `eval` get their model: a fedl model file (safetensors carrying fedl.arch,
// fedl.input_shape and fedl.classes), a zoo spec, or a TorchScript module (with or without
// weights from a model file); and how a model file is written.
#pragma once

#include "backends/loader.hpp"
#include "core/dataset.hpp"
#include "core/safetensors.hpp"

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedl::cmd {

struct ModelSource
{
  std::optional<std::filesystem::path> model;       // --model
  std::optional<std::string> arch;                  // --arch
  std::optional<std::filesystem::path> torchscript; // --torchscript
  std::optional<std::int64_t> classes;              // --classes (with --arch)
  std::uint64_t seed = 0;
};

struct OpenedModel
{
  backends::Model model;
  std::string arch;                       // zoo spec, or "torchscript"
  std::vector<std::int64_t> input_shape;
  std::int64_t classes = 0;               // 0: unknown (TorchScript without a model file)
  std::optional<std::string> file_sha256; // of --model's bytes
};

// Opens the model on `device` of `backend` and checks that `data` fits it (feature count,
// labels below the class count, naming the first offending line). Throws UsageError for
// contradictory sources, VerifyError for a model file that is not a fedl model.
OpenedModel open_model(const backends::Backend& backend,
                       const std::string& device,
                       const ModelSource& source,
                       const core::Dataset& data);

// The metadata every fedl model and update carries.
core::Metadata model_metadata(const OpenedModel& m, const std::string& kind);

} // namespace fedl::cmd
