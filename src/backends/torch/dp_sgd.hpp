// SPDX-License-Identifier: Apache-2.0
// DP-SGD for the torch backend (Abadi et al. 2016, "Deep Learning with Differential Privacy",
// Algorithm 1): each step draws a Poisson-sampled batch, clips every example's gradient (over
// all parameters) to L2 norm C, adds Gaussian noise N(0, (sigma C)^2) to the sum of the clipped
// gradients and divides by the expected batch size. backend.cpp's training loop calls
// private_gradient() once per step and then lets the optimizer step as usual.
#pragma once

#include "backends/torch/zoo.hpp"

#include "core/math/noise.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fedl::backends::torch_backend::dp {

// The indices (int64, ascending, CPU) of a Poisson-sampled batch: each of `n` examples
// independently with probability `q`.
torch::Tensor poisson_sample(int64_t n, double q, at::Generator& gen);

struct ClippedSum
{
  // Sum over the batch of the clipped per-example gradients, one per Model::parameters() entry
  // in that order; undefined for a parameter that does not require a gradient.
  std::vector<torch::Tensor> grads;
  torch::Tensor norms; // [batch] each example's gradient L2 norm before clipping (CPU, float64)
  double loss_sum = 0; // sum of the per-example cross-entropy losses
};

// Per-example gradients from one forward and one backward of the whole batch (Goodfellow 2015,
// "Efficient Per-Example Gradient Computations"): the zoo's forward records each Linear and
// Conv2d layer's input a_i and output on a Tape; the backward yields the gradient g_i of the
// summed loss with respect to each output, and each example's weight gradient is g_i a_i^T
// (Linear) or g_i unfold(a_i)^T (Conv2d, computed as one grouped convolution). nullopt if the
// tape does not cover every trained parameter (a TorchScript model, or a zoo layer the tape does
// not know).
std::optional<ClippedSum> clipped_sum_vectorized(Model& model, const torch::Tensor& x, const torch::Tensor& y,
                                                 double max_grad_norm);

// The fallback for any model: one forward and one backward per example. Correct for every model
// whose examples do not interact in forward (no batch norm in training mode), but much slower
// than clipped_sum_vectorized: `batch` small passes instead of one large one.
ClippedSum clipped_sum_per_example(Model& model, const torch::Tensor& x, const torch::Tensor& y, double max_grad_norm);

// clipped_sum_vectorized where it covers the model, else clipped_sum_per_example.
ClippedSum clipped_sum(Model& model, const torch::Tensor& x, const torch::Tensor& y, double max_grad_norm);

// The noise: core's GaussianNoise (AES-256-CTR key stream from getrandom(), ziggurat), not
// LibTorch's generators, which are Mersenne twisters seeded with 32 bits: whoever sees the noised
// update could search all 2^32 seeds, which a DP guarantee must not allow.
using GaussianNoise = core::GaussianNoise;
// `n` draws of N(0, stddev^2) from `noise`'s key stream, as a CPU float64 tensor.
torch::Tensor gaussian(GaussianNoise& noise, int64_t n, double stddev);

struct Settings
{
  double noise_multiplier = 0; // sigma
  double max_grad_norm = 0;    // C
  double expected_batch = 1;   // the configured batch size (q * count)
};

// Sets the gradient of every parameter that requires one to
// (sum of clipped per-example gradients + N(0, (sigma C)^2 I)) / expected_batch, the noisy sum
// computed in double and snapped to core::noise_grid(sigma C) first. An empty batch gets the
// noise alone. Returns the batch's sum of per-example losses (0 when empty).
double private_gradient(Model& model, const torch::Tensor& x, const torch::Tensor& y, const Settings& settings,
                        GaussianNoise& noise);

} // namespace fedl::backends::torch_backend::dp
