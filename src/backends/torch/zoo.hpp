// SPDX-License-Identifier: Apache-2.0
// The torch backend's model wrapper: a built-in zoo module or a TorchScript module behind one
// forward() and one list of named weights.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fedl::backends::torch_backend {

// What a zoo model's forward records for DP-SGD's per-example gradients (dp_sgd.hpp): for each
// Linear or Conv2d layer, its parameters, its input and its output (still in the autograd graph).
struct TapeEntry
{
  torch::Tensor weight;
  torch::Tensor bias;   // undefined if the layer has none
  torch::Tensor input;  // detached: [batch, in] for Linear, [batch, C, H, W] for Conv2d
  torch::Tensor output; // [batch, out] or [batch, out, H', W']
  bool conv = false;
  // Conv2d only (groups 1, zero padding).
  std::vector<int64_t> kernel, stride, padding, dilation;
};

struct Tape
{
  std::vector<TapeEntry> layers;
};

class Model
{
public:
  // A zoo model (spec as core::parse_model_spec accepts) for samples of `input_shape`.
  static std::unique_ptr<Model> create(const std::string& spec, const std::vector<int64_t>& input_shape,
                                       int64_t classes, uint64_t seed, const torch::Device& device);
  static std::unique_ptr<Model> load_torchscript(const std::string& path, const torch::Device& device);

  torch::Tensor forward(const torch::Tensor& x) { return forward(x, nullptr); }
  // With a tape, a zoo model records its Linear and Conv2d layers there; a TorchScript model
  // records nothing.
  torch::Tensor forward(const torch::Tensor& x, Tape* tape);
  bool is_torchscript() const { return m_script != nullptr; }
  void train_mode(bool on);
  // Parameters (trainable), then floating-point buffers, named as PyTorch's state_dict().
  std::vector<std::pair<std::string, torch::Tensor>> named_weights() const;
  std::vector<torch::Tensor> parameters() const;
  const torch::Device& device() const { return m_device; }

private:
  explicit Model(const torch::Device& device) : m_device(device) {}

  std::shared_ptr<torch::nn::Module> m_zoo;
  std::function<torch::Tensor(const torch::Tensor&, Tape*)> m_zoo_forward;
  std::unique_ptr<torch::jit::Module> m_script;
  torch::Device m_device;
};

} // namespace fedl::backends::torch_backend
