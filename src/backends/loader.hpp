// SPDX-License-Identifier: Apache-2.0
// Finding, loading and calling compute backends (shared objects behind backend.h), from the
// torch-free fedl binary. Search order (DESIGN §9): FEDL_BACKEND_PATH folders, then
// <dir of fedl>/../lib/fedl/backends, then the folder of the fedl executable.
#pragma once

#include "backends/backend.h"
#include "core/format/dataset.hpp"
#include "core/format/safetensors.hpp"

#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace fedl::backends {

struct Backend
{
  std::filesystem::path path;
  const fedl_backend_v1* api = nullptr;
  std::vector<std::string> devices;
};

struct LoadFailure
{
  std::filesystem::path path;
  std::string reason;
};

// The folders searched for libfedl-backend-*.so, in order. The executable's folder is read once
// (from /proc, which a sandbox may not show): call this before entering one.
std::vector<std::filesystem::path> search_path();
// The same, joined with ':' for messages.
std::string search_path_text();

// Loads every backend found (first of each name wins). Loading a LibTorch backend costs
// ~0.3 s, so only commands that compute call this. `failures` receives the files that could
// not be loaded, with why.
const std::vector<Backend>& all_backends(std::vector<LoadFailure>* failures = nullptr);
// Whether all_backends() has run in this process (a fork server's child inherits its backends).
bool backends_loaded() noexcept;

// Resolves `--device` (auto, cpu, cuda, cuda:N, or a backend name) to a backend and one of its
// devices. Throws UsageError (exit 2) listing the devices present if there is none such, and
// Error (exit 1) naming what to install if no backend loads at all.
std::pair<const Backend*, std::string> resolve_device(const std::string& device);

// The backend's report on the TorchScript module at `path` (fedl-inspect(1)), read before
// anything of it runs. Throws Error if the backend cannot inspect modules, VerifyError (exit 3)
// if the file is not one.
std::string inspect_torchscript(const Backend& backend, const std::filesystem::path& path);

// A model living in a backend. Every failure becomes a core::Error with the backend's message
// and the matching exit code.
class Model
{
public:
  Model(const Backend& backend, fedl_model* handle) : m_backend(&backend), m_handle(handle) {}
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  Model(Model&& other) noexcept;
  Model& operator=(Model&&) = delete;
  ~Model();

  static Model create(const Backend& backend, const std::string& device, const std::string& spec,
                      const std::vector<std::int64_t>& input_shape, std::int64_t classes, std::uint64_t seed);
  static Model load_torchscript(const Backend& backend, const std::string& device, const std::filesystem::path& path);

  // Views of the model's current weights; valid until the next call on this model.
  std::vector<core::TensorView> weights();
  // Loads weights from a safetensors file's tensors (`what` names the file in errors).
  void set_weights(const core::Safetensors& weights, const std::string& what);

  // Returns false to stop training (exit 130). See fedl_progress_fn.
  using Progress = std::function<bool(std::uint32_t epoch, std::uint64_t step, std::uint64_t steps_per_epoch,
                                      double loss, bool epoch_done)>;
  fedl_train_result train(const core::Dataset& data, const fedl_train_config& config, const Progress& progress);
  fedl_eval_result evaluate(const core::Dataset& data, std::uint32_t batch_size);
  // Whether the backend gives class probabilities (predict), which metrics beyond accuracy and
  // loss need.
  bool can_predict() const noexcept { return m_backend->api->model_predict != nullptr; }
  // The class probabilities of samples [first, first + out.size() / classes) of `data`, row by
  // row. Throws Error if the backend cannot (can_predict) or the outputs have another width.
  void predict(const core::Dataset& data, std::uint64_t first, std::int64_t classes, std::span<float> out);

private:
  void check(int status, const std::string& context) const;

  const Backend* m_backend;
  fedl_model* m_handle;
};

} // namespace fedl::backends
