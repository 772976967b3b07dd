// SPDX-License-Identifier: Apache-2.0
// The built-in models. Tensor names follow the equivalent PyTorch modules' state_dict()
// (documented in fedl-files(5)), so PyTorch users can load fedl's weights with load_state_dict.
#include "backends/torch/zoo.hpp"

#include "core/format/model_spec.hpp"

#include <numeric>
#include <stdexcept>

namespace fedl::backends::torch_backend {

namespace {

int64_t
numel_of(const std::vector<int64_t>& shape)
{
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
}

// A Linear layer's forward, recorded on `tape` if there is one.
torch::Tensor
linear(torch::nn::LinearImpl& fc, const torch::Tensor& x, Tape* tape)
{
  auto out = fc.forward(x);
  if (tape != nullptr) {
    tape->layers.push_back(TapeEntry{fc.weight, fc.bias, x.detach(), out, false, {}, {}, {}, {}});
  }
  return out;
}

// A Conv2d layer's forward, recorded if it has one group (Conv2dOptions keeps the padding in a
// variant whose type differs between LibTorch 1.13 and 2.x, so the zoo passes the zero padding
// it set). A layer not recorded makes DP-SGD fall back to one example at a time.
torch::Tensor
conv2d(torch::nn::Conv2dImpl& conv, const torch::Tensor& x, int64_t padding, Tape* tape)
{
  auto out = conv.forward(x);
  if (tape != nullptr && conv.options.groups() == 1) {
    const auto& o = conv.options;
    auto vec = [](const torch::ExpandingArray<2>& a) { return std::vector<int64_t>{(*a)[0], (*a)[1]}; };
    tape->layers.push_back(TapeEntry{conv.weight,
                                     conv.bias,
                                     x.detach(),
                                     out,
                                     true,
                                     vec(o.kernel_size()),
                                     vec(o.stride()),
                                     {padding, padding},
                                     vec(o.dilation())});
  }
  return out;
}

// class LogReg(nn.Module): fc = nn.Linear(in, classes); forward(x) = fc(x.flatten(1))
struct LogRegImpl : torch::nn::Module
{
  LogRegImpl(int64_t in, int64_t classes) : fc(register_module("fc", torch::nn::Linear(in, classes))) {}
  torch::Tensor forward(const torch::Tensor& x, Tape* tape) { return linear(*fc, x.flatten(1), tape); }
  torch::nn::Linear fc;
};

// class MLP(nn.Module): layers = nn.Sequential(Linear(in, H1), ReLU(), ..., Linear(Hk, classes))
struct MlpImpl : torch::nn::Module
{
  MlpImpl(int64_t in, const std::vector<int64_t>& hidden, int64_t classes)
  {
    torch::nn::Sequential seq;
    int64_t prev = in;
    for (const auto h : hidden) {
      seq->push_back(torch::nn::Linear(prev, h));
      seq->push_back(torch::nn::ReLU());
      prev = h;
    }
    seq->push_back(torch::nn::Linear(prev, classes));
    layers = register_module("layers", seq);
  }
  torch::Tensor forward(const torch::Tensor& x, Tape* tape)
  {
    if (tape == nullptr) {
      return layers->forward(x.flatten(1));
    }
    auto h = x.flatten(1);
    for (auto& layer : *layers) {
      if (auto* fc = layer.ptr()->as<torch::nn::LinearImpl>(); fc != nullptr) {
        h = linear(*fc, h, tape);
      } else {
        h = layer.forward(h);
      }
    }
    return h;
  }
  torch::nn::Sequential layers{nullptr};
};

// class CNN(nn.Module): conv1 = Conv2d(1, 32, 3, padding=1), conv2 = Conv2d(32, 64, 3, padding=1),
// fc1 = Linear(64*7*7, 128), fc2 = Linear(128, classes);
// forward: pool(relu(conv1)), pool(relu(conv2)), flatten, relu(fc1), fc2 (pool = max_pool2d 2).
struct CnnImpl : torch::nn::Module
{
  explicit CnnImpl(int64_t classes)
    : conv1(register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(kPadding)))),
      conv2(register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(kPadding)))),
      fc1(register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128))),
      fc2(register_module("fc2", torch::nn::Linear(128, classes)))
  {
  }
  static constexpr int64_t kPadding = 1;
  torch::Tensor forward(const torch::Tensor& input, Tape* tape)
  {
    auto x = input.reshape({-1, 1, 28, 28});
    x = torch::max_pool2d(torch::relu(conv2d(*conv1, x, kPadding, tape)), 2);
    x = torch::max_pool2d(torch::relu(conv2d(*conv2, x, kPadding, tape)), 2);
    x = torch::relu(linear(*fc1, x.flatten(1), tape));
    return linear(*fc2, x, tape);
  }
  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
};

template<typename Impl>
std::function<torch::Tensor(const torch::Tensor&, Tape*)>
forward_of(const std::shared_ptr<Impl>& m)
{
  return [m](const torch::Tensor& x, Tape* tape) { return m->forward(x, tape); };
}

} // namespace

std::unique_ptr<Model>
Model::create(const std::string& spec_text, const std::vector<int64_t>& input_shape, int64_t classes, uint64_t seed,
              const torch::Device& device)
{
  const auto spec = core::parse_model_spec(spec_text);
  spec.check_input(input_shape);
  if (classes < 1) {
    throw std::invalid_argument("a model needs at least one class");
  }
  torch::manual_seed(seed);
  std::unique_ptr<Model> model(new Model(device));
  const auto in = numel_of(input_shape);
  switch (spec.kind) {
  case core::ArchKind::logreg: {
    auto m = std::make_shared<LogRegImpl>(in, classes);
    model->m_zoo = m;
    model->m_zoo_forward = forward_of(m);
    break;
  }
  case core::ArchKind::mlp: {
    auto m = std::make_shared<MlpImpl>(in, spec.hidden, classes);
    model->m_zoo = m;
    model->m_zoo_forward = forward_of(m);
    break;
  }
  case core::ArchKind::cnn: {
    auto m = std::make_shared<CnnImpl>(classes);
    model->m_zoo = m;
    model->m_zoo_forward = forward_of(m);
    break;
  }
  }
  model->m_zoo->to(device);
  return model;
}

std::unique_ptr<Model>
Model::load_torchscript(const std::string& path, const torch::Device& device)
{
  std::unique_ptr<Model> model(new Model(device));
  model->m_script = std::make_unique<torch::jit::Module>(torch::jit::load(path, device));
  return model;
}

torch::Tensor
Model::forward(const torch::Tensor& x, Tape* tape)
{
  if (m_script) {
    return m_script->forward({x}).toTensor();
  }
  return m_zoo_forward(x, tape);
}

void
Model::train_mode(bool on)
{
  if (m_script) {
    m_script->train(on);
  } else {
    m_zoo->train(on);
  }
}

std::vector<std::pair<std::string, torch::Tensor>>
Model::named_weights() const
{
  std::vector<std::pair<std::string, torch::Tensor>> out;
  if (m_script) {
    for (const auto& p : m_script->named_parameters(/*recurse=*/true)) {
      out.emplace_back(p.name, p.value);
    }
    for (const auto& b : m_script->named_buffers(/*recurse=*/true)) {
      if (b.value.is_floating_point()) {
        out.emplace_back(b.name, b.value);
      }
    }
    return out;
  }
  for (const auto& p : m_zoo->named_parameters(/*recurse=*/true)) {
    out.emplace_back(p.key(), p.value());
  }
  for (const auto& b : m_zoo->named_buffers(/*recurse=*/true)) {
    if (b.value().is_floating_point()) {
      out.emplace_back(b.key(), b.value());
    }
  }
  return out;
}

std::vector<torch::Tensor>
Model::parameters() const
{
  std::vector<torch::Tensor> out;
  if (m_script) {
    for (const auto& p : m_script->parameters(/*recurse=*/true)) {
      out.push_back(p);
    }
    return out;
  }
  return m_zoo->parameters(/*recurse=*/true);
}

} // namespace fedl::backends::torch_backend
