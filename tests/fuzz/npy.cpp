// SPDX-License-Identifier: Apache-2.0
// Fuzz target "npy": load_dataset (core/format/dataset.hpp) on an NPY features array and its labels
// array, each gzip-compressed or not. Input: one option byte (bit 0: find the labels beside the
// features, x.npy -> y.npy; bit 3: --limit-samples 1 + the high nibble), then the two files as
// fuzz.hpp's split_two cuts them (features first).
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
  const auto [features, labels] = fuzz::split_two({data + 1, size - 1});
  core::DataOptions opt;
  opt.path = fuzz::scratch().write("x.npy", features);
  const auto labels_path = fuzz::scratch().write("y.npy", labels);
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
  FEDL_FUZZ_CHECK(ds.format == core::DataFormat::npy);
  return 0;
}
