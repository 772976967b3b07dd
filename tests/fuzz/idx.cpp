// SPDX-License-Identifier: Apache-2.0
// Fuzz target "idx": load_dataset (core/format/dataset.hpp) on an IDX images file and its labels file,
// each gzip-compressed or not. Input: one option byte (bit 0: find the labels beside the
// images, as fedl does without --labels; bit 3: --limit-samples 1 + the high nibble), then the
// two files as fuzz.hpp's split_two cuts them (images first).
#include "dataset.hpp"

#include "core/util/error.hpp"

using namespace fedl;

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  if (size < 1) {
    return 0;
  }
  const std::uint8_t flags = data[0];
  const auto [images, labels] = fuzz::split_two({data + 1, size - 1});
  core::DataOptions opt;
  opt.path = fuzz::scratch().write("train-images-idx3-ubyte", images);
  const auto labels_path = fuzz::scratch().write("train-labels-idx1-ubyte", labels);
  if ((flags & 0x01) == 0) {
    opt.labels = labels_path;
  }
  opt.limit = fuzz::limit_from(flags);
  core::Dataset ds;
  try {
    ds = core::load_dataset(opt);
  } catch (const core::Error& e) {
    fuzz::refused(e);
    return 0;
  }
  fuzz::check_dataset(ds, opt);
  FEDL_FUZZ_CHECK(ds.format == core::DataFormat::idx);
  for (const float f : ds.features) {
    FEDL_FUZZ_CHECK(f >= 0 && f <= 1);
  }
  return 0;
}
