// SPDX-License-Identifier: Apache-2.0
#include "backends/loader.hpp"

#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <dlfcn.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <set>

namespace fs = std::filesystem;

namespace fedl::backends {

namespace {

fs::path
executable_dir()
{
  static const fs::path dir = [] {
    std::array<char, 4096> buf{};
    const auto n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
    return n <= 0 ? fs::path() : fs::path(std::string(buf.data(), static_cast<std::size_t>(n))).parent_path();
  }();
  return dir;
}

std::atomic<bool> g_loaded{false};

fedl_dataset
as_c_dataset(const core::Dataset& data)
{
  return fedl_dataset{data.features.data(), data.labels.data(), data.size(),
                      static_cast<std::int32_t>(data.sample_shape.size()), data.sample_shape.data()};
}

core::ExitCode
exit_code_of(int status)
{
  switch (status) {
  case FEDL_STATUS_USAGE:
    return core::ExitCode::usage;
  case FEDL_STATUS_VERIFY:
    return core::ExitCode::verify;
  case FEDL_STATUS_INTERRUPTED:
    return core::ExitCode::interrupted;
  default:
    return core::ExitCode::failure;
  }
}

// Why a backend whose entry point refused FEDL_BACKEND_ABI_VERSION cannot be used: an older
// build (interface 1 had no DP-SGD settings in fedl_train_config) or something else entirely.
// Asking an entry point for a version it lacks is harmless: it returns NULL.
std::string
interface_mismatch(fedl_backend_entry_fn entry)
{
  for (std::uint32_t v = FEDL_BACKEND_ABI_VERSION - 1; v >= 1; --v) {
    if (entry(v) != nullptr) {
      return fmt::format("it implements backend interface version {} but this fedl needs version {}; install the "
                         "backend built with this fedl",
                         v, FEDL_BACKEND_ABI_VERSION);
    }
  }
  return fmt::format("its {} offers no interface version {}", FEDL_BACKEND_ENTRY_SYMBOL, FEDL_BACKEND_ABI_VERSION);
}

} // namespace

bool
backends_loaded() noexcept
{
  return g_loaded;
}

std::string
search_path_text()
{
  std::string out;
  for (const auto& d : search_path()) {
    // Not `(sep) + d.string()`: GCC 12 at -O3 warns (-Wrestrict, a false positive) on that.
    if (!out.empty()) {
      out += ':';
    }
    out += d.string();
  }
  return out;
}

std::vector<fs::path>
search_path()
{
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("FEDL_BACKEND_PATH"); env != nullptr) {
    for (const auto& item : core::split_text(env, ":")) {
      dirs.emplace_back(item);
    }
  }
  const auto exe = executable_dir();
  if (!exe.empty()) {
    dirs.push_back((exe / ".." / "lib" / "fedl" / "backends").lexically_normal());
    dirs.push_back(exe);
  }
  return dirs;
}

namespace {

// GNU OpenMP (LibTorch's and OpenBLAS's thread pool) keeps an idle worker spinning for 300,000
// iterations (milliseconds) after each parallel region unless told otherwise. Between the many
// small operations of a training step, on a host whose cores other processes also want (several
// sites, their trainers and a coordinator on one box), that spinning is most of the CPU: 10 sites
// at their default threads took 0.78 s per round against 0.24 s with --threads 1, the trainers
// 1.13 s of CPU against 0.07 s. With 1000 spins the round takes 0.25 s (10000: 0.29 s; sleeping at
// once, OMP_WAIT_POLICY=PASSIVE: 0.24 s), while a process alone on its cores keeps most of the
// cheap hand-off between operations (fedl train's loop: cnn 2.42 s against 2.85 s at libgomp's
// default, mlp 0.19 s against 0.15 s; docs/PERFORMANCE.md). Read by libgomp when it is loaded, so
// set before the first backend is; a user's own setting is left alone.
void
default_openmp_wait()
{
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && std::getenv("GOMP_SPINCOUNT") == nullptr) {
    ::setenv("GOMP_SPINCOUNT", "1000", 0);
  }
}

} // namespace

const std::vector<Backend>&
all_backends(std::vector<LoadFailure>* failures)
{
  static std::vector<LoadFailure> s_failures;
  static const std::vector<Backend> s_backends = [] {
    g_loaded = true;
    default_openmp_wait();
    std::vector<Backend> found;
    std::set<std::string> names;
    for (const auto& dir : search_path()) {
      std::error_code ec;
      std::vector<fs::path> files;
      for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const auto name = entry.path().filename().string();
        if (name.rfind("libfedl-backend-", 0) == 0 && entry.path().extension() == ".so") {
          files.push_back(entry.path());
        }
      }
      std::sort(files.begin(), files.end());
      for (const auto& file : files) {
        void* handle = ::dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (handle == nullptr) {
          s_failures.push_back({file, ::dlerror()});
          continue;
        }
        auto entry = reinterpret_cast<fedl_backend_entry_fn>(::dlsym(handle, FEDL_BACKEND_ENTRY_SYMBOL));
        const fedl_backend_v1* api = entry != nullptr ? entry(FEDL_BACKEND_ABI_VERSION) : nullptr;
        if (api == nullptr) {
          s_failures.push_back({file, entry == nullptr ? fmt::format("no symbol {}", FEDL_BACKEND_ENTRY_SYMBOL)
                                                       : interface_mismatch(entry)});
          ::dlclose(handle);
          continue;
        }
        if (!names.insert(api->name).second) {
          continue; // an earlier folder in the search path wins
        }
        Backend b{file, api, {}};
        for (std::size_t i = 0; i < api->device_count(); ++i) {
          b.devices.emplace_back(api->device_name(i));
        }
        FEDL_LOG_DEBUG("loaded backend {} ({}) from {}: devices {}", api->name, api->runtime, file.string(),
                       fmt::join(b.devices, ", "));
        found.push_back(std::move(b)); // the handle stays open for the life of the process
      }
    }
    return found;
  }();
  if (failures != nullptr) {
    *failures = s_failures;
  }
  return s_backends;
}

std::pair<const Backend*, std::string>
resolve_device(const std::string& device)
{
  std::vector<LoadFailure> failures;
  const auto& backends = all_backends(&failures);
  if (backends.empty()) {
    std::string why;
    for (const auto& f : failures) {
      why += fmt::format("\n  {}: {}", f.path.string(), f.reason);
    }
    throw core::Error("no compute backend could be loaded (searched {}); install fedl's backend "
                      "libfedl-backend-torch.so or set FEDL_BACKEND_PATH{}",
                      search_path_text(), why);
  }
  std::vector<std::string> present;
  for (const auto& b : backends) {
    present.insert(present.end(), b.devices.begin(), b.devices.end());
  }
  auto find = [&](auto&& match) -> std::pair<const Backend*, std::string> {
    for (const auto& b : backends) {
      for (const auto& d : b.devices) {
        if (match(b, d)) {
          return {&b, d};
        }
      }
    }
    return {nullptr, {}};
  };
  std::pair<const Backend*, std::string> hit;
  if (device == "auto") {
    hit = find([](const Backend&, const std::string& d) { return d != "cpu"; });
    if (hit.first == nullptr) {
      hit = find([](const Backend&, const std::string&) { return true; });
    }
  } else if (device == "cuda") {
    hit = find([](const Backend&, const std::string& d) { return d.rfind("cuda:", 0) == 0; });
  } else {
    hit = find([&](const Backend& b, const std::string& d) { return d == device || b.api->name == device; });
  }
  if (hit.first == nullptr) {
    throw core::UsageError("device '{}' is not available on this machine; present: {} (or auto)", device,
                           fmt::join(present, ", "));
  }
  return hit;
}

Model::Model(Model&& other) noexcept : m_backend(other.m_backend), m_handle(std::exchange(other.m_handle, nullptr)) {}

Model::~Model()
{
  if (m_handle != nullptr) {
    m_backend->api->model_free(m_handle);
  }
}

void
Model::check(int status, const std::string& context) const
{
  if (status != FEDL_STATUS_OK) {
    throw core::Error(exit_code_of(status), "{}{}", context, m_backend->api->last_error());
  }
}

Model
Model::create(const Backend& backend, const std::string& device, const std::string& spec,
              const std::vector<std::int64_t>& input_shape, std::int64_t classes, std::uint64_t seed)
{
  fedl_model* handle = nullptr;
  const int rc = backend.api->model_create(spec.c_str(), static_cast<std::int32_t>(input_shape.size()),
                                           input_shape.data(), classes, seed, device.c_str(), &handle);
  if (rc != FEDL_STATUS_OK) {
    throw core::Error(exit_code_of(rc), "cannot create model {}: {}", spec, backend.api->last_error());
  }
  return Model(backend, handle);
}

std::string
inspect_torchscript(const Backend& backend, const fs::path& path)
{
  if (backend.api->torchscript_inspect == nullptr) {
    throw core::Error("the {} backend ({}) cannot inspect TorchScript modules, so fedl will not run {} on it",
                      backend.api->name, backend.path.string(), path.string());
  }
  if (!fs::exists(path)) {
    throw core::Error("cannot open {}: No such file or directory", path.string());
  }
  const char* report = nullptr;
  const int rc = backend.api->torchscript_inspect(path.c_str(), &report);
  if (rc != FEDL_STATUS_OK) {
    throw core::Error(exit_code_of(rc), "{}", backend.api->last_error());
  }
  return report;
}

Model
Model::load_torchscript(const Backend& backend, const std::string& device, const fs::path& path)
{
  if (!fs::exists(path)) {
    throw core::Error("cannot open {}: No such file or directory", path.string());
  }
  fedl_model* handle = nullptr;
  const int rc = backend.api->model_load_torchscript(path.c_str(), device.c_str(), &handle);
  if (rc != FEDL_STATUS_OK) {
    throw core::Error(exit_code_of(rc), "{}", backend.api->last_error());
  }
  return Model(backend, handle);
}

std::vector<core::TensorView>
Model::weights()
{
  const fedl_tensor* tensors = nullptr;
  std::size_t count = 0;
  check(m_backend->api->model_get_weights(m_handle, &tensors, &count), "reading the model's weights: ");
  std::vector<core::TensorView> out;
  out.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto& t = tensors[i];
    out.push_back(core::TensorView{t.name,
                                   t.dtype == FEDL_F64 ? core::DType::f64 : core::DType::f32,
                                   std::vector<std::int64_t>(t.shape, t.shape + t.ndim),
                                   {static_cast<const std::byte*>(t.data), t.nbytes}});
  }
  return out;
}

void
Model::set_weights(const core::Safetensors& weights, const std::string& what)
{
  std::vector<fedl_tensor> tensors;
  tensors.reserve(weights.tensors.size());
  for (const auto& t : weights.tensors) {
    if (t.dtype != core::DType::f32 && t.dtype != core::DType::f64) {
      throw core::VerifyError("{}: tensor {} has dtype {}; fedl models hold F32 or F64 weights", what, t.name,
                              core::dtype_name(t.dtype));
    }
    tensors.push_back(fedl_tensor{t.name.c_str(), t.dtype == core::DType::f64 ? FEDL_F64 : FEDL_F32,
                                  static_cast<std::int32_t>(t.shape.size()), t.shape.data(),
                                  const_cast<std::byte*>(t.data.data()), t.data.size()});
  }
  check(m_backend->api->model_set_weights(m_handle, tensors.data(), tensors.size()),
        fmt::format("{} does not fit the model: ", what));
}

fedl_train_result
Model::train(const core::Dataset& data, const fedl_train_config& config, const Progress& progress)
{
  const auto c_data = as_c_dataset(data);
  fedl_train_result result{};
  auto trampoline = [](void* user, std::uint32_t epoch, std::uint64_t step, std::uint64_t steps, double loss,
                       int done) {
    const auto* fn = static_cast<const Progress*>(user);
    return (*fn)(epoch, step, steps, loss, done != 0) ? 0 : 1;
  };
  const int rc = m_backend->api->model_train(m_handle, &c_data, &config, progress ? +trampoline : nullptr,
                                             const_cast<Progress*>(&progress), &result);
  check(rc, fmt::format("training on {}: ", data.source.string()));
  return result;
}

fedl_eval_result
Model::evaluate(const core::Dataset& data, std::uint32_t batch_size)
{
  const auto c_data = as_c_dataset(data);
  fedl_eval_result result{};
  check(m_backend->api->model_evaluate(m_handle, &c_data, batch_size, &result),
        fmt::format("evaluating on {}: ", data.source.string()));
  return result;
}

void
Model::predict(const core::Dataset& data, std::uint64_t first, std::int64_t classes, std::span<float> out)
{
  if (!can_predict()) {
    throw core::Error("the {} backend ({}) gives no class probabilities: only accuracy and loss can be measured "
                      "with it (--metrics-set basic)",
                      m_backend->api->name, m_backend->path.string());
  }
  const auto c_data = as_c_dataset(data);
  check(m_backend->api->model_predict(m_handle, &c_data, first, out.size() / static_cast<std::size_t>(classes), classes,
                                      out.data()),
        fmt::format("predicting on {}: ", data.source.string()));
}

} // namespace fedl::backends
