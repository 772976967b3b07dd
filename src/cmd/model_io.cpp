// SPDX-License-Identifier: Apache-2.0
#include "cmd/model_io.hpp"

#include "core/error.hpp"
#include "core/model_spec.hpp"

#include <fmt/format.h>

#include <charconv>

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
required_meta(const core::Safetensors& st, const std::string& key, const fs::path& path)
{
  auto v = st.meta(key);
  if (!v) {
    throw core::VerifyError("{}: no {} in its metadata; is it a model written by fedl?", path.string(), key);
  }
  return *v;
}

// fedl.classes of a model file: a positive integer, else VerifyError.
std::int64_t
classes_of(const core::Safetensors& st, const fs::path& path)
{
  const auto text = required_meta(st, "fedl.classes", path);
  std::int64_t classes = 0;
  const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), classes);
  if (ec != std::errc{} || p != text.data() + text.size() || classes < 1) {
    throw core::VerifyError("{}: fedl.classes is not a positive integer: {}", path.string(), text);
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

OpenedModel
open_model(const backends::Backend& backend,
           const std::string& device,
           const ModelSource& src,
           const core::Dataset& data)
{
  if (src.model && src.arch) {
    throw core::UsageError("--model and --arch both name the model; give one (a model file knows its architecture)");
  }
  if (!src.model && !src.arch && !src.torchscript) {
    throw core::UsageError("no model: give --model FILE, --arch SPEC or --torchscript FILE");
  }
  if (src.classes && !src.arch) {
    throw core::UsageError("--classes applies to --arch only (other models know their classes)");
  }
  if (src.torchscript && src.arch) {
    throw core::UsageError("--torchscript and --arch both name the model; give one");
  }
  if (src.arch) {
    const auto spec = core::parse_model_spec(*src.arch);
    spec.check_input(data.sample_shape);
    const auto classes = src.classes.value_or(data.num_classes());
    if (classes < 2 && !src.classes) {
      throw core::Error("{}: all labels are {}; a classifier needs at least two classes (or give --classes K)",
                        data.source.string(), classes - 1);
    }
    OpenedModel m{backends::Model::create(backend, device, spec.text, data.sample_shape, classes, src.seed),
                  spec.text, data.sample_shape, classes, std::nullopt};
    check_fits(m, data);
    return m;
  }

  std::optional<core::SafetensorsFile> file;
  if (src.model) {
    file.emplace(*src.model);
    const auto& st = file->content();
    const auto kind = st.meta("fedl.kind");
    if (kind && *kind != "model") {
      throw core::UsageError("{} is a fedl {}, not a model; give a model file (fedl train --save-model, "
                             "fedl aggregate --out)",
                             src.model->string(), *kind);
    }
  }

  if (src.torchscript) {
    auto ts = backends::Model::load_torchscript(backend, device, *src.torchscript);
    OpenedModel m{std::move(ts), "torchscript", data.sample_shape, 0, std::nullopt};
    if (file) {
      m.model.set_weights(file->content(), src.model->string());
      m.file_sha256 = file->sha256();
      if (file->content().meta("fedl.classes")) {
        m.classes = classes_of(file->content(), *src.model);
      }
    }
    check_fits(m, data);
    return m;
  }

  const auto& st = file->content();
  const auto arch = required_meta(st, "fedl.arch", *src.model);
  if (arch == "torchscript") {
    throw core::UsageError("{} holds the weights of a TorchScript model: give the module with --torchscript FILE",
                           src.model->string());
  }
  try {
    (void)core::parse_model_spec(arch);
  } catch (const core::UsageError& e) {
    throw core::VerifyError("{}: fedl.arch is not a valid architecture: {}", src.model->string(), e.what());
  }
  std::vector<std::int64_t> input_shape;
  try {
    input_shape = core::parse_shape(required_meta(st, "fedl.input_shape", *src.model), "fedl.input_shape");
  } catch (const core::UsageError& e) {
    throw core::VerifyError("{}: {}", src.model->string(), e.what());
  }
  const auto classes = classes_of(st, *src.model);
  OpenedModel m{backends::Model::create(backend, device, arch, input_shape, classes, src.seed), arch, input_shape,
                classes, file->sha256()};
  check_fits(m, data);
  m.model.set_weights(st, src.model->string());
  return m;
}

core::Metadata
model_metadata(const OpenedModel& m, const std::string& kind)
{
  core::Metadata meta{{"fedl.kind", kind}, {"fedl.arch", m.arch}, {"fedl.input_shape", core::shape_to_string(m.input_shape)}};
  if (m.classes > 0) {
    meta["fedl.classes"] = std::to_string(m.classes);
  }
  return meta;
}

} // namespace fedl::cmd
