// SPDX-License-Identifier: Apache-2.0
// libfedl-backend-torch.so: the LibTorch compute backend behind the C interface of
// backends/backend.h. Everything here is ordinary LibTorch C++; nothing of it crosses the
// interface but C types.
#include "backends/backend.h"

#include "backends/torch/dp_sgd.hpp"
#include "backends/torch/inspect.hpp"
#include "backends/torch/zoo.hpp"

#include <torch/torch.h>

#include <malloc.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace tb = fedl::backends::torch_backend;

struct fedl_model
{
  std::unique_ptr<tb::Model> model;
  // Storage behind the fedl_tensor views that model_get_weights hands out.
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<torch::Tensor> host;
  std::vector<fedl_tensor> views;
};

namespace {

thread_local std::string t_last_error;

class StatusError : public std::runtime_error
{
public:
  StatusError(int status, const std::string& message) : std::runtime_error(message), m_status(status) {}
  int status() const { return m_status; }

private:
  int m_status;
};

// Runs `fn`, turning every exception into a status and a last_error message.
template<typename Fn>
int
guarded(Fn&& fn)
{
  try {
    fn();
    return FEDL_STATUS_OK;
  } catch (const StatusError& e) {
    t_last_error = e.what();
    return e.status();
  } catch (const c10::Error& e) {
    t_last_error = e.what_without_backtrace();
    return FEDL_STATUS_FAILURE;
  } catch (const std::exception& e) {
    t_last_error = e.what();
    return FEDL_STATUS_FAILURE;
  }
}

std::vector<std::string>&
devices()
{
  static std::vector<std::string> list = [] {
    std::vector<std::string> d;
    if (torch::cuda::is_available()) {
      for (size_t i = 0; i < torch::cuda::device_count(); ++i) {
        d.push_back("cuda:" + std::to_string(i));
      }
    }
    d.emplace_back("cpu");
    return d;
  }();
  return list;
}

torch::Device
parse_device(const char* name)
{
  const std::string s = name != nullptr ? name : "cpu";
  for (const auto& d : devices()) {
    if (d == s) {
      return torch::Device(s);
    }
  }
  throw StatusError(FEDL_STATUS_USAGE, "device " + s + " is not available to the torch backend");
}

torch::Tensor
features_tensor(const fedl_dataset& data)
{
  std::vector<int64_t> shape{static_cast<int64_t>(data.count)};
  shape.insert(shape.end(), data.sample_shape, data.sample_shape + data.sample_ndim);
  // from_blob does not copy; the caller keeps the buffer alive for the whole call.
  return torch::from_blob(const_cast<float*>(data.features), shape, torch::kFloat32);
}

torch::Tensor
labels_tensor(const fedl_dataset& data)
{
  return torch::from_blob(const_cast<int64_t*>(data.labels), {static_cast<int64_t>(data.count)}, torch::kInt64);
}

void
check_outputs(const torch::Tensor& logits, const torch::Tensor& labels, int64_t offset)
{
  if (logits.dim() != 2) {
    throw StatusError(FEDL_STATUS_DATA, "the model's output has " + std::to_string(logits.dim()) +
                                          " dimensions; fedl needs [batch, classes] logits");
  }
  const auto classes = logits.size(1);
  const auto bad = (labels >= classes).nonzero();
  if (bad.numel() > 0) {
    const auto i = bad[0][0].item<int64_t>();
    throw StatusError(FEDL_STATUS_DATA, "sample " + std::to_string(offset + i) + " has label " +
                                          std::to_string(labels[i].item<int64_t>()) + " but the model has only " +
                                          std::to_string(classes) + " classes");
  }
}

size_t
b_device_count()
{
  return devices().size();
}

const char*
b_device_name(size_t i)
{
  return i < devices().size() ? devices()[i].c_str() : nullptr;
}

const char*
b_last_error()
{
  return t_last_error.c_str();
}

void
b_set_threads(int32_t threads)
{
  if (threads > 0) {
    torch::set_num_threads(threads);
  }
}

int
b_model_create(const char* spec, int32_t ndim, const int64_t* shape, int64_t classes, uint64_t seed, const char* device,
               fedl_model** out)
{
  return guarded([&] {
    const auto dev = parse_device(device);
    auto m = std::make_unique<fedl_model>();
    try {
      m->model = tb::Model::create(spec, std::vector<int64_t>(shape, shape + ndim), classes, seed, dev);
    } catch (const std::invalid_argument& e) {
      throw StatusError(FEDL_STATUS_USAGE, e.what());
    }
    *out = m.release();
  });
}

// What a file torch.jit.load cannot read is (exit 3), with PyTorch's reason.
StatusError
not_a_module(const char* path, const c10::Error& e)
{
  return StatusError(FEDL_STATUS_VERIFY,
                     std::string(path) +
                       " is not a TorchScript module that torch.jit.load can read: " + e.what_without_backtrace());
}

int
b_model_load_torchscript(const char* path, const char* device, fedl_model** out)
{
  return guarded([&] {
    const auto dev = parse_device(device);
    auto m = std::make_unique<fedl_model>();
    try {
      m->model = tb::Model::load_torchscript(path, dev);
    } catch (const c10::Error& e) {
      throw not_a_module(path, e);
    }
    *out = m.release();
  });
}

int
b_torchscript_inspect(const char* path, const char** report)
{
  thread_local std::string text;
  return guarded([&] {
    try {
      text = tb::inspect_torchscript(path);
    } catch (const c10::Error& e) {
      throw not_a_module(path, e);
    } catch (const std::runtime_error& e) {
      throw StatusError(FEDL_STATUS_VERIFY, e.what());
    }
    *report = text.c_str();
  });
}

void
b_model_free(fedl_model* m)
{
  delete m;
}

int
b_model_get_weights(fedl_model* m, const fedl_tensor** tensors, size_t* count)
{
  return guarded([&] {
    m->names.clear();
    m->shapes.clear();
    m->host.clear();
    m->views.clear();
    for (const auto& [name, t] : m->model->named_weights()) {
      auto host = t.detach().to(torch::kCPU).contiguous();
      if (host.scalar_type() != torch::kFloat32 && host.scalar_type() != torch::kFloat64) {
        host = host.to(torch::kFloat32);
      }
      m->names.push_back(name);
      m->shapes.push_back(host.sizes().vec());
      m->host.push_back(host);
    }
    for (size_t i = 0; i < m->host.size(); ++i) {
      const auto& h = m->host[i];
      m->views.push_back(fedl_tensor{m->names[i].c_str(), h.scalar_type() == torch::kFloat64 ? FEDL_F64 : FEDL_F32,
                                     static_cast<int32_t>(m->shapes[i].size()), m->shapes[i].data(), h.data_ptr(),
                                     static_cast<size_t>(h.nbytes())});
    }
    *tensors = m->views.data();
    *count = m->views.size();
  });
}

int
b_model_set_weights(fedl_model* m, const fedl_tensor* tensors, size_t count)
{
  return guarded([&] {
    auto weights = m->model->named_weights();
    if (count != weights.size()) {
      throw StatusError(FEDL_STATUS_DATA, "the model has " + std::to_string(weights.size()) +
                                            " tensors but the weights file has " + std::to_string(count));
    }
    torch::NoGradGuard no_grad;
    for (auto& [name, target] : weights) {
      const fedl_tensor* src = nullptr;
      for (size_t i = 0; i < count; ++i) {
        if (name == tensors[i].name) {
          src = &tensors[i];
        }
      }
      if (src == nullptr) {
        throw StatusError(FEDL_STATUS_DATA, "the weights have no tensor " + name + " that the model needs");
      }
      const std::vector<int64_t> shape(src->shape, src->shape + src->ndim);
      if (shape != target.sizes().vec()) {
        throw StatusError(FEDL_STATUS_DATA, "tensor " + name + " has shape " + c10::str(c10::IntArrayRef(shape)) +
                                              " but the model needs " + c10::str(target.sizes()));
      }
      const auto dtype = src->dtype == FEDL_F64 ? torch::kFloat64 : torch::kFloat32;
      target.copy_(torch::from_blob(src->data, shape, dtype));
    }
  });
}

std::unique_ptr<torch::optim::Optimizer>
make_optimizer(const std::vector<torch::Tensor>& params, const fedl_train_config& cfg)
{
  if (cfg.optimizer == FEDL_OPT_ADAM) {
    return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(cfg.lr));
  }
  return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum));
}

[[noreturn]] void
diverged(double loss, uint32_t epoch)
{
  throw StatusError(FEDL_STATUS_DATA, "training diverged (loss is " + std::to_string(loss) + " at epoch " +
                                        std::to_string(epoch) + "); lower --lr or scale the features");
}

// `v` as written by hand: 1, 0.5, -1, nan, inf.
std::string
number(double v)
{
  std::ostringstream out;
  out << v;
  return out.str();
}

// The DP-SGD settings of `cfg` (backend.h): USAGE for values that make no sense, and for noise
// without clipping, which would silently train without privacy.
void
check_dp_config(const fedl_train_config& cfg, uint64_t count)
{
  const double c = cfg.dp_max_grad_norm;
  const double sigma = cfg.dp_noise_multiplier;
  if (!std::isfinite(c) || c < 0) {
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD: the clipping norm (dp_max_grad_norm) must be a finite number "
                                         "> 0, or 0 for no DP-SGD; got " +
                                           number(c));
  }
  if (!std::isfinite(sigma) || sigma < 0) {
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD: the noise multiplier (dp_noise_multiplier) must be a finite "
                                         "number >= 0; got " +
                                           number(sigma));
  }
  if (c == 0) {
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD: a noise multiplier (" + number(sigma) +
                                           ") needs a clipping norm (dp_max_grad_norm > 0); without one "
                                           "training would not be private");
  }
  if (cfg.batch_size == 0) {
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD needs a batch size of at least 1");
  }
  if (cfg.batch_size > count) {
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD samples each example with probability batch size / examples, so "
                                         "the batch size (" +
                                           std::to_string(cfg.batch_size) +
                                           ") cannot exceed the number of training examples (" + std::to_string(count) +
                                           ")");
  }
}

// DP-SGD (dp_sgd.hpp): ceil(count / batch_size) steps per epoch, each on a Poisson-sampled batch
// with clipped per-example gradients and Gaussian noise. A separate loop so that the ordinary
// one below stays as it was.
void
train_dp(tb::Model& model, const fedl_dataset& data, const fedl_train_config& cfg, fedl_progress_fn progress,
         void* user, fedl_train_result& result)
{
  check_dp_config(cfg, data.count);
  if (model.named_weights().size() != model.parameters().size()) {
    // Buffers (BatchNorm's running statistics) go into the update but are neither clipped nor
    // noised: DP-SGD would not cover them.
    throw StatusError(FEDL_STATUS_USAGE, "DP-SGD cannot protect this model: it has floating-point buffers (such as "
                                         "BatchNorm running statistics) that are sent with the update but neither "
                                         "clipped nor noised; remove them or train without DP-SGD");
  }
  const auto& dev = model.device();
  torch::manual_seed(cfg.seed);
  const auto x_all = features_tensor(data);
  const auto y_all = labels_tensor(data);
  const auto params = model.parameters();
  auto opt = make_optimizer(params, cfg);
  std::vector<torch::Tensor> start;
  if (cfg.prox_mu > 0) {
    for (const auto& p : params) {
      start.push_back(p.detach().clone());
    }
  }
  const auto n = static_cast<int64_t>(data.count);
  const auto bs = static_cast<int64_t>(cfg.batch_size);
  const double q = static_cast<double>(bs) / static_cast<double>(n);
  const auto steps_per_epoch = static_cast<uint64_t>((n + bs - 1) / bs);
  tb::dp::GaussianNoise noise(cfg.dp_noise_seed);
  // The batches are secret too: amplification by sampling assumes nobody knows which examples a
  // step used, and the coordinator chose cfg.seed. With OS noise, the sampler's seed comes from
  // the same key stream; a fixed noise seed (tests) keeps cfg.seed's reproducible batches.
  uint64_t sampler_seed = cfg.seed;
  if (cfg.dp_noise_seed == 0) {
    noise.key_stream(std::as_writable_bytes(std::span(&sampler_seed, 1)));
  }
  auto sampler = at::detail::createCPUGenerator(sampler_seed);
  const tb::dp::Settings settings{cfg.dp_noise_multiplier, cfg.dp_max_grad_norm, static_cast<double>(bs)};
  model.train_mode(true);
  {
    // Batches may be empty: check the output shape and the labels once, up front.
    torch::NoGradGuard no_grad;
    check_outputs(model.forward(x_all.narrow(0, 0, 1).to(dev)), y_all, 0);
  }
  uint64_t steps = 0;
  double epoch_loss = 0;
  for (uint32_t epoch = 1; epoch <= cfg.epochs; ++epoch) {
    double loss_sum = 0;
    int64_t sampled = 0;
    for (uint64_t step = 1; step <= steps_per_epoch; ++step) {
      const auto idx = tb::dp::poisson_sample(n, q, sampler);
      const auto x = x_all.index_select(0, idx).to(dev, /*non_blocking=*/true);
      const auto y = y_all.index_select(0, idx).to(dev, /*non_blocking=*/true);
      const double batch_loss = tb::dp::private_gradient(model, x, y, settings, noise);
      if (cfg.prox_mu > 0) {
        // FedProx's term does not depend on the data: added after the noise, not clipped.
        torch::NoGradGuard no_grad;
        for (size_t i = 0; i < params.size(); ++i) {
          if (params[i].grad().defined()) {
            params[i].mutable_grad().add_(params[i] - start[i], cfg.prox_mu);
          }
        }
      }
      opt->step();
      const auto b = idx.size(0);
      // The step's mean loss; an empty batch reports the epoch's mean so far.
      const double l =
        b > 0 ? batch_loss / static_cast<double>(b) : (sampled > 0 ? loss_sum / static_cast<double>(sampled) : 0.0);
      if (!std::isfinite(l)) {
        diverged(l, epoch);
      }
      loss_sum += batch_loss;
      sampled += b;
      ++steps;
      if (progress != nullptr && (steps == 1 || step % 50 == 0) &&
          progress(user, epoch, step, steps_per_epoch, l, 0) != 0) {
        throw StatusError(FEDL_STATUS_INTERRUPTED, "training interrupted");
      }
    }
    epoch_loss = sampled > 0 ? loss_sum / static_cast<double>(sampled) : 0.0;
    if (progress != nullptr && progress(user, epoch, steps_per_epoch, steps_per_epoch, epoch_loss, 1) != 0) {
      throw StatusError(FEDL_STATUS_INTERRUPTED, "training interrupted");
    }
  }
  result.loss = epoch_loss;
  result.samples = data.count;
  result.steps = steps;
  result.dp_steps = steps;
}

int
b_model_train(fedl_model* m, const fedl_dataset* data, const fedl_train_config* cfg, fedl_progress_fn progress,
              void* user, fedl_train_result* result)
{
  return guarded([&] {
    if (cfg->dp_max_grad_norm != 0 || cfg->dp_noise_multiplier != 0) {
      train_dp(*m->model, *data, *cfg, progress, user, *result);
      return;
    }
    auto& model = *m->model;
    const auto& dev = model.device();
    torch::manual_seed(cfg->seed);
    const auto x_all = features_tensor(*data);
    const auto y_all = labels_tensor(*data);
    const auto params = model.parameters();
    auto opt = make_optimizer(params, *cfg);
    std::vector<torch::Tensor> start;
    if (cfg->prox_mu > 0) {
      for (const auto& p : params) {
        start.push_back(p.detach().clone());
      }
    }
    const auto n = static_cast<int64_t>(data->count);
    const auto bs = static_cast<int64_t>(std::max<uint32_t>(cfg->batch_size, 1));
    const auto steps_per_epoch = static_cast<uint64_t>((n + bs - 1) / bs);
    auto gen = at::detail::createCPUGenerator(cfg->seed);
    model.train_mode(true);
    uint64_t steps = 0;
    double epoch_loss = 0;
    bool checked = false;
    for (uint32_t epoch = 1; epoch <= cfg->epochs; ++epoch) {
      const auto perm = torch::randperm(n, gen, torch::TensorOptions().dtype(torch::kInt64));
      double loss_sum = 0;
      for (int64_t begin = 0; begin < n; begin += bs) {
        const auto idx = perm.slice(0, begin, std::min(begin + bs, n));
        auto x = x_all.index_select(0, idx).to(dev, /*non_blocking=*/true);
        auto y = y_all.index_select(0, idx).to(dev, /*non_blocking=*/true);
        opt->zero_grad();
        auto logits = model.forward(x);
        if (!checked) {
          check_outputs(logits, y_all, 0);
          checked = true;
        }
        auto loss = torch::nn::functional::cross_entropy(logits, y);
        if (cfg->prox_mu > 0) {
          auto prox = torch::zeros({}, loss.options());
          for (size_t i = 0; i < params.size(); ++i) {
            prox = prox + (params[i] - start[i]).pow(2).sum();
          }
          loss = loss + 0.5 * cfg->prox_mu * prox;
        }
        loss.backward();
        opt->step();
        const double l = loss.item<double>();
        if (!std::isfinite(l)) {
          diverged(l, epoch);
        }
        loss_sum += l * static_cast<double>(idx.size(0));
        ++steps;
        const auto step_in_epoch = static_cast<uint64_t>(begin / bs) + 1;
        if (progress != nullptr && (steps == 1 || step_in_epoch % 50 == 0) &&
            progress(user, epoch, step_in_epoch, steps_per_epoch, l, 0) != 0) {
          throw StatusError(FEDL_STATUS_INTERRUPTED, "training interrupted");
        }
      }
      epoch_loss = loss_sum / static_cast<double>(n);
      if (progress != nullptr && progress(user, epoch, steps_per_epoch, steps_per_epoch, epoch_loss, 1) != 0) {
        throw StatusError(FEDL_STATUS_INTERRUPTED, "training interrupted");
      }
    }
    result->loss = epoch_loss;
    result->samples = data->count;
    result->steps = steps;
    result->dp_steps = 0;
  });
}

int
b_model_evaluate(fedl_model* m, const fedl_dataset* data, uint32_t batch_size, fedl_eval_result* result)
{
  return guarded([&] {
    auto& model = *m->model;
    torch::NoGradGuard no_grad;
    model.train_mode(false);
    const auto x_all = features_tensor(*data);
    const auto y_all = labels_tensor(*data);
    const auto n = static_cast<int64_t>(data->count);
    const auto bs = static_cast<int64_t>(std::max<uint32_t>(batch_size, 1));
    double loss_sum = 0;
    int64_t correct = 0;
    for (int64_t begin = 0; begin < n; begin += bs) {
      const auto end = std::min(begin + bs, n);
      auto x = x_all.slice(0, begin, end).to(model.device());
      auto y = y_all.slice(0, begin, end).to(model.device());
      auto logits = model.forward(x);
      check_outputs(logits, y, begin);
      loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
    }
    result->loss = loss_sum / static_cast<double>(n);
    result->accuracy = static_cast<double>(correct) / static_cast<double>(n);
    result->samples = data->count;
  });
}

int
b_model_predict(fedl_model* m, const fedl_dataset* data, uint64_t first, uint64_t count, int64_t classes,
                float* probabilities)
{
  return guarded([&] {
    if (first > data->count || count > data->count - first) {
      throw StatusError(FEDL_STATUS_USAGE, "samples " + std::to_string(first) + " to " + std::to_string(first + count) +
                                             " are past the data's " + std::to_string(data->count));
    }
    auto& model = *m->model;
    torch::NoGradGuard no_grad;
    model.train_mode(false);
    const auto x = features_tensor(*data)
                     .slice(0, static_cast<int64_t>(first), static_cast<int64_t>(first + count))
                     .to(model.device());
    const auto logits = model.forward(x);
    if (logits.dim() != 2 || logits.size(1) != classes) {
      throw StatusError(FEDL_STATUS_DATA, "the model's output is [" + std::to_string(logits.size(0)) + ", " +
                                            std::to_string(logits.dim() > 1 ? logits.size(1) : 0) + "] where [batch, " +
                                            std::to_string(classes) + "] class scores were expected");
    }
    const auto p = torch::softmax(logits.to(torch::kFloat32), 1).to(torch::kCPU).contiguous();
    std::memcpy(probabilities, p.data_ptr<float>(), static_cast<size_t>(p.numel()) * sizeof(float));
  });
}

std::string
runtime_name()
{
  std::string s = "LibTorch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                  std::to_string(TORCH_VERSION_PATCH);
  return s;
}

} // namespace

// glibc returns freed blocks above 128 KB to the kernel at once and trims the heap top, so the
// same large tensor buffers are unmapped and faulted in again at every training step: 1.3 M
// minor faults and ~3 s of kernel time for one cnn epoch on 10k Fashion-MNIST images with 2
// threads (bench/train_vs_pytorch.sh). Keeping buffers up to 32 MB on the heap and trimming it
// only past 1 GB removes that churn (62 k faults; the training loop ran in 4.0 s instead of 6.0 s).
static void
keep_large_buffers() noexcept
{
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

extern "C" __attribute__((visibility("default"))) const fedl_backend_v1*
fedl_backend_entry(uint32_t abi_version)
{
  static const bool tuned = (keep_large_buffers(), true);
  (void)tuned;
  static const std::string runtime = runtime_name();
  static const fedl_backend_v1 table{
    FEDL_BACKEND_ABI_VERSION,
    "torch",
    runtime.c_str(),
    b_device_count,
    b_device_name,
    b_last_error,
    b_set_threads,
    b_model_create,
    b_model_load_torchscript,
    b_model_free,
    b_model_get_weights,
    b_model_set_weights,
    b_model_train,
    b_model_evaluate,
    b_torchscript_inspect,
    b_model_predict,
  };
  return abi_version == FEDL_BACKEND_ABI_VERSION ? &table : nullptr;
}
