// SPDX-License-Identifier: Apache-2.0
// The torch backend's model wrapper: a built-in zoo module or a TorchScript module behind one
// forward() and one list of named weights.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fedl::backends::torch_backend {

class Model
{
public:
  // A zoo model (spec as core::parse_model_spec accepts) for samples of `input_shape`.
  static std::unique_ptr<Model> create(const std::string& spec,
                                       const std::vector<int64_t>& input_shape,
                                       int64_t classes,
                                       uint64_t seed,
                                       const torch::Device& device);
  static std::unique_ptr<Model> load_torchscript(const std::string& path, const torch::Device& device);

  torch::Tensor forward(const torch::Tensor& x);
  void train_mode(bool on);
  // Parameters (trainable), then floating-point buffers, named as PyTorch's state_dict().
  std::vector<std::pair<std::string, torch::Tensor>> named_weights() const;
  std::vector<torch::Tensor> parameters() const;
  const torch::Device& device() const { return m_device; }

private:
  explicit Model(const torch::Device& device) : m_device(device) {}

  std::shared_ptr<torch::nn::Module> m_zoo;
  std::function<torch::Tensor(const torch::Tensor&)> m_zoo_forward;
  std::unique_ptr<torch::jit::Module> m_script;
  torch::Device m_device;
};

} // namespace fedl::backends::torch_backend
