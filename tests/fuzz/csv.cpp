// SPDX-License-Identifier: Apache-2.0
// Fuzz target "csv": load_dataset (core/format/dataset.hpp) on a CSV file, gzip-compressed or not (the
// loader looks at the bytes, not the name). The first input byte sets the options that fedl's
// data flags give: bit 0 --no-header, bits 1-2 --label-column (none, "0", "label", "1"), bit 3
// --limit-samples (1 + the high nibble). The rest is the file.
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
  core::DataOptions opt;
  opt.path = fuzz::scratch().write("data.csv", {data + 1, size - 1});
  opt.header = (flags & 0x01) == 0;
  static const char* const columns[] = {nullptr, "0", "label", "1"};
  if (const char* c = columns[(flags >> 1) & 0x03]) {
    opt.label_column = c;
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
  FEDL_FUZZ_CHECK(ds.format == core::DataFormat::csv && ds.sample_shape.size() == 1);
  return 0;
}
