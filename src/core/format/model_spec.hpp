// SPDX-License-Identifier: Apache-2.0
// Architecture spec strings of the built-in model zoo: `logreg`, `mlp:H1[,H2,...]`, `cnn`.
// Parsed here (no LibTorch) so that a bad spec is a usage error before any backend loads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fedl::core {

enum class ArchKind
{
  logreg,
  mlp,
  cnn
};

struct ModelSpec
{
  ArchKind kind = ArchKind::logreg;
  std::vector<std::int64_t> hidden; // mlp: the hidden layer widths
  std::string text;                 // the canonical spec string

  // Throws UsageError if the zoo model cannot take inputs of `input_shape` (cnn needs 28x28
  // single-channel images, given as 1,28,28, 28,28 or 784 features).
  void check_input(const std::vector<std::int64_t>& input_shape) const;
};

// Throws UsageError (exit 2) naming the spec and listing the valid forms.
ModelSpec parse_model_spec(const std::string& text);

} // namespace fedl::core
