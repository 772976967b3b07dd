// SPDX-License-Identifier: Apache-2.0
#include "core/format/model_spec.hpp"

#include "core/format/dataset.hpp"
#include "core/util/error.hpp"

#include <fmt/ranges.h>

namespace fedl::core {

namespace {

constexpr const char* k_forms = "valid specs: logreg, mlp:H1[,H2,...] (e.g. mlp:128,64), cnn";

} // namespace

ModelSpec
parse_model_spec(const std::string& text)
{
  ModelSpec spec;
  if (text == "logreg") {
    spec.kind = ArchKind::logreg;
  } else if (text == "cnn") {
    spec.kind = ArchKind::cnn;
  } else if (text.rfind("mlp:", 0) == 0) {
    spec.kind = ArchKind::mlp;
    try {
      spec.hidden = parse_shape(text.substr(4), "--arch");
    } catch (const UsageError&) {
      throw UsageError("unknown architecture '{}': mlp needs positive hidden widths, as in mlp:128,64", text);
    }
    spec.text = fmt::format("mlp:{}", fmt::join(spec.hidden, ","));
    return spec;
  } else if (text == "mlp") {
    throw UsageError("architecture 'mlp' needs hidden layer widths, as in mlp:128 or mlp:256,128");
  } else {
    throw UsageError("unknown architecture '{}'; {}", text, k_forms);
  }
  spec.text = text;
  return spec;
}

void
ModelSpec::check_input(const std::vector<std::int64_t>& input_shape) const
{
  if (kind != ArchKind::cnn) {
    return;
  }
  std::int64_t numel = 1;
  for (const auto d : input_shape) {
    numel *= d;
  }
  if (numel != 28 * 28) {
    throw UsageError("the cnn architecture takes 28x28 single-channel images, but the data has samples of "
                     "shape {}; use logreg or mlp:H for this data",
                     shape_to_string(input_shape));
  }
}

} // namespace fedl::core
