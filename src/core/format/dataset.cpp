// SPDX-License-Identifier: Apache-2.0
#include "core/format/dataset.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

bool
ends_with(const std::string& s, std::string_view suffix)
{
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string_view
trim(std::string_view s)
{
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '"')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '"')) {
    s.remove_suffix(1);
  }
  return s;
}

std::vector<std::string_view>
split_commas(std::string_view line)
{
  std::vector<std::string_view> cells;
  std::size_t start = 0;
  for (;;) {
    const auto comma = line.find(',', start);
    cells.push_back(trim(line.substr(start, comma == std::string_view::npos ? comma : comma - start)));
    if (comma == std::string_view::npos) {
      break;
    }
    start = comma + 1;
  }
  return cells;
}

// Features become floats: a finite double past the range of float would be undefined to convert
// (and would be inf if it were done anyway).
bool
fits_float(double v)
{
  return std::isfinite(v) && std::abs(v) <= std::numeric_limits<float>::max();
}

// Labels become int64 class indices; a billion classes is far past any model fedl builds, and
// keeps the conversion defined (inf and 1e300 are not integers that fit).
bool
is_class_index(double v)
{
  return v >= 0 && v <= 1e9 && v == std::floor(v);
}

std::string_view
as_text(const std::vector<std::byte>& bytes)
{
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// Calls `fn(line_number, line)` for each non-empty line.
template<typename Fn>
void
for_each_line(std::string_view text, Fn&& fn)
{
  std::uint32_t number = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto nl = text.find('\n', pos);
    if (nl == std::string_view::npos) {
      nl = text.size();
    }
    ++number;
    auto line = text.substr(pos, nl - pos);
    if (!line.empty() && line.back() == '\r') {
      line.remove_suffix(1);
    }
    pos = nl + 1;
    if (trim(line).empty()) {
      continue;
    }
    if (!fn(number, line)) {
      return;
    }
  }
}

std::size_t
resolve_label_column(const std::optional<std::string>& spec, const std::vector<std::string_view>& header,
                     std::size_t columns, const fs::path& path)
{
  if (!spec) {
    return columns - 1;
  }
  std::size_t index = 0;
  const auto* b = spec->data();
  const auto* e = b + spec->size();
  if (auto [p, ec] = std::from_chars(b, e, index); ec == std::errc{} && p == e) {
    if (index >= columns) {
      throw UsageError("--label-column {}: {} has only {} columns (0-based index)", *spec, path.string(), columns);
    }
    return index;
  }
  const auto it = std::find(header.begin(), header.end(), *spec);
  if (it == header.end()) {
    throw UsageError("--label-column {}: no such column in the header of {}{}", *spec, path.string(),
                     header.empty() ? " (it has no header: give a 0-based index)"
                                    : fmt::format(" (columns: {})", fmt::join(header, ", ")));
  }
  return static_cast<std::size_t>(it - header.begin());
}

// A cell that parses as a number in full.
bool
is_number(std::string_view cell)
{
  double v = 0;
  const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), v);
  return ec == std::errc{} && p == cell.data() + cell.size() && !cell.empty();
}

Dataset
load_csv(const DataOptions& opt)
{
  const auto bytes = read_maybe_gzip(opt.path);
  const auto text = as_text(bytes);
  Dataset ds;
  ds.format = DataFormat::csv;
  ds.source = opt.path;
  std::vector<std::string_view> header;
  std::size_t columns = 0;
  std::size_t label_col = 0;
  const std::size_t limit = opt.limit.value_or(SIZE_MAX);
  bool first = true;
  for_each_line(text, [&](std::uint32_t number, std::string_view line) {
    auto cells = split_commas(line);
    if (first) {
      first = false;
      columns = cells.size();
      if (columns < 2) {
        throw Error("{}: line {}: expected at least 2 comma-separated columns (features and a label)",
                    opt.path.string(), number);
      }
      if (opt.header.value_or(true)) {
        if (!opt.header && std::all_of(cells.begin(), cells.end(), is_number)) {
          throw UsageError("{}: line {} is all numbers, so it may be data rather than a header: give --no-header if "
                           "the file has no header row, or --header if this row is one",
                           opt.path.string(), number);
        }
        header = cells;
        ds.columns.assign(cells.begin(), cells.end());
        label_col = resolve_label_column(opt.label_column, header, columns, opt.path);
        return true;
      }
      label_col = resolve_label_column(opt.label_column, header, columns, opt.path);
    }
    if (ds.size() >= limit) {
      return false;
    }
    if (cells.size() != columns) {
      throw Error("{}: line {}: {} columns where the first row has {}", opt.path.string(), number, cells.size(),
                  columns);
    }
    for (std::size_t c = 0; c < columns; ++c) {
      const auto cell = cells[c];
      double v = 0;
      const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), v);
      if (ec != std::errc{} || p != cell.data() + cell.size() || cell.empty()) {
        throw Error("{}: line {}, column {}: '{}' is not a number{}", opt.path.string(), number, c + 1, cell,
                    number == 1 && opt.header == false ? " (if this row is a header, drop --no-header)" : "");
      }
      if (!fits_float(v)) {
        throw Error("{}: line {}, column {}: {} is not a finite number in the range of a 32-bit float",
                    opt.path.string(), number, c + 1, cell);
      }
      if (c == label_col) {
        if (!is_class_index(v)) {
          throw Error("{}: line {}, column {}: label {} is not a class index (0, 1, 2, ...)", opt.path.string(), number,
                      c + 1, cell);
        }
        ds.labels.push_back(static_cast<std::int64_t>(v));
      } else {
        ds.features.push_back(static_cast<float>(v));
      }
    }
    ds.lines.push_back(number);
    return true;
  });
  if (columns == 0 || ds.size() == 0) {
    throw Error("{}: no data rows", opt.path.string());
  }
  ds.sample_shape = {static_cast<std::int64_t>(columns - 1)};
  return ds;
}

std::uint32_t
read_be32(std::span<const std::byte> b, std::size_t at)
{
  return (std::to_integer<std::uint32_t>(b[at]) << 24) | (std::to_integer<std::uint32_t>(b[at + 1]) << 16) |
         (std::to_integer<std::uint32_t>(b[at + 2]) << 8) | std::to_integer<std::uint32_t>(b[at + 3]);
}

struct Idx
{
  std::vector<std::byte> bytes;
  std::vector<std::int64_t> dims;
  std::size_t offset = 0;
};

// IDX (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): bytes 0-1 zero, byte 2 the
// element type (0x08 = unsigned byte), byte 3 the number of dimensions, then each dimension as
// a big-endian uint32, then the data.
Idx
read_idx(const fs::path& path)
{
  Idx idx;
  idx.bytes = read_maybe_gzip(path);
  const std::span<const std::byte> b(idx.bytes);
  if (b.size() < 4 || b[0] != std::byte{0} || b[1] != std::byte{0}) {
    throw VerifyError("{}: not an IDX file (bad magic number)", path.string());
  }
  if (b[2] != std::byte{0x08}) {
    throw Error("{}: IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", path.string(),
                std::to_integer<int>(b[2]));
  }
  const auto ndims = std::to_integer<std::size_t>(b[3]);
  if (ndims == 0 || ndims > 4 || b.size() < 4 + 4 * ndims) {
    throw VerifyError("{}: not an IDX file or truncated header", path.string());
  }
  std::uint64_t total = 1;
  for (std::size_t i = 0; i < ndims; ++i) {
    const auto d = read_be32(b, 4 + 4 * i);
    idx.dims.push_back(d);
    if (d != 0 && total > b.size() / d) {
      throw VerifyError("{}: IDX header announces more data than the file has: truncated or corrupt", path.string());
    }
    total *= d;
  }
  idx.offset = 4 + 4 * ndims;
  if (b.size() - idx.offset != total) {
    throw VerifyError("{}: IDX header announces {} bytes of data but the file has {}: truncated or corrupt",
                      path.string(), total, b.size() - idx.offset);
  }
  return idx;
}

// A dimension of 0 after the first would make samples of no features, which no model takes.
void
check_sample_shape(const std::vector<std::int64_t>& shape, const fs::path& path)
{
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) {
    throw Error("{}: samples of shape ({}) have no features", path.string(), fmt::join(shape, ","));
  }
}

// Where IDX and NPY data find their labels file: the data file's name with one part swapped.
using NameSwaps = std::vector<std::pair<std::string, std::string>>;
const NameSwaps idx_label_names{{"images-idx3", "labels-idx1"}, {"images", "labels"}};
const NameSwaps npy_label_names{{"features", "labels"}, {"images", "labels"}, {"x", "y"}, {"X", "y"}};

fs::path
sibling_labels(const fs::path& data, const NameSwaps& swaps, const char* flag_hint)
{
  const auto name = data.filename().string();
  for (const auto& [from, to] : swaps) {
    const auto at = name.find(from);
    if (at != std::string::npos) {
      auto candidate = data.parent_path() / (name.substr(0, at) + to + name.substr(at + from.size()));
      if (fs::exists(candidate)) {
        return candidate;
      }
      throw Error("{}: the labels file {} beside it does not exist; give it with {}", data.string(), candidate.string(),
                  flag_hint);
    }
  }
  throw UsageError("{}: cannot tell where its labels are; give them with {}", data.string(), flag_hint);
}

// IDX and NPY data's labels: --labels, or the file beside the data.
fs::path
labels_file(const DataOptions& opt, const NameSwaps& swaps)
{
  return opt.labels ? *opt.labels : sibling_labels(opt.path, swaps, "--labels");
}

void
apply_limit(Dataset& ds, std::optional<std::size_t> limit)
{
  if (limit && *limit < ds.size()) {
    ds.labels.resize(*limit);
    ds.features.resize(*limit * ds.sample_numel());
  }
}

Dataset
load_idx(const DataOptions& opt)
{
  const auto labels_path = labels_file(opt, idx_label_names);
  const auto images = read_idx(opt.path);
  const auto labels = read_idx(labels_path);
  if (labels.dims.size() != 1) {
    throw Error("{}: a labels file must be one-dimensional, this one has {} dimensions", labels_path.string(),
                labels.dims.size());
  }
  if (images.dims[0] != labels.dims[0]) {
    throw Error("{} has {} samples but its labels file {} has {}", opt.path.string(), images.dims[0],
                labels_path.string(), labels.dims[0]);
  }
  Dataset ds;
  ds.format = DataFormat::idx;
  ds.source = opt.path;
  const auto n = std::min<std::size_t>(static_cast<std::size_t>(images.dims[0]), opt.limit.value_or(SIZE_MAX));
  // One channel: {rows, cols} images become {1, rows, cols}, as a convolution expects.
  if (images.dims.size() == 3) {
    ds.sample_shape = {1, images.dims[1], images.dims[2]};
  } else {
    ds.sample_shape.assign(images.dims.begin() + 1, images.dims.end());
    if (ds.sample_shape.empty()) {
      ds.sample_shape = {1};
    }
  }
  check_sample_shape(ds.sample_shape, opt.path);
  const auto numel = ds.sample_numel();
  ds.features.resize(n * numel);
  const auto* src = images.bytes.data() + images.offset;
  for (std::size_t i = 0; i < n * numel; ++i) {
    ds.features[i] = static_cast<float>(std::to_integer<unsigned>(src[i])) / 255.0F;
  }
  ds.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    ds.labels[i] = std::to_integer<std::int64_t>(labels.bytes[labels.offset + i]);
  }
  return ds;
}

// NPY format version 1.0-3.0 (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html):
// "\x93NUMPY", major, minor, a little-endian header length (2 bytes in 1.x, 4 in 2.x/3.x), and a
// Python dict literal with 'descr', 'fortran_order' and 'shape'; then the raw array data.
struct Npy
{
  std::vector<std::byte> bytes;
  std::string descr;
  std::vector<std::int64_t> shape;
  std::size_t offset = 0;
};

std::string
npy_field(const std::string& header, const std::string& key, const fs::path& path)
{
  const auto k = header.find("'" + key + "'");
  if (k == std::string::npos) {
    throw VerifyError("{}: NPY header has no '{}'", path.string(), key);
  }
  auto colon = header.find(':', k);
  if (colon == std::string::npos) {
    throw VerifyError("{}: corrupt NPY header", path.string());
  }
  auto v = header.find_first_not_of(' ', colon + 1);
  if (v == std::string::npos) {
    throw VerifyError("{}: corrupt NPY header", path.string());
  }
  if (header[v] == '\'') {
    const auto end = header.find('\'', v + 1);
    return header.substr(v + 1, end - v - 1);
  }
  if (header[v] == '(') {
    const auto end = header.find(')', v);
    return header.substr(v + 1, end - v - 1);
  }
  const auto end = header.find_first_of(",}", v);
  return std::string(trim(header.substr(v, end - v)));
}

Npy
read_npy(const fs::path& path)
{
  Npy npy;
  npy.bytes = read_maybe_gzip(path);
  const std::span<const std::byte> b(npy.bytes);
  if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0) {
    throw VerifyError("{}: not an NPY file (bad magic string)", path.string());
  }
  const auto major = std::to_integer<int>(b[6]);
  std::size_t hlen = 0;
  std::size_t start = 0;
  if (major == 1) {
    hlen = std::to_integer<std::size_t>(b[8]) | (std::to_integer<std::size_t>(b[9]) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) {
      throw VerifyError("{}: truncated NPY header", path.string());
    }
    for (int i = 3; i >= 0; --i) {
      hlen = (hlen << 8) | std::to_integer<std::size_t>(b[8 + static_cast<std::size_t>(i)]);
    }
    start = 12;
  } else {
    throw Error("{}: NPY format version {} is not supported", path.string(), major);
  }
  if (hlen > b.size() - start) {
    throw VerifyError("{}: truncated NPY header", path.string());
  }
  const std::string header(reinterpret_cast<const char*>(b.data() + start), hlen);
  npy.offset = start + hlen;
  npy.descr = npy_field(header, "descr", path);
  if (npy_field(header, "fortran_order", path) != "False") {
    throw Error("{}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray", path.string());
  }
  const auto shape = npy_field(header, "shape", path);
  std::uint64_t total = 1;
  for (auto cell : split_commas(shape)) {
    if (cell.empty()) {
      continue;
    }
    std::int64_t d = 0;
    const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), d);
    if (ec != std::errc{} || d < 0 || d > (std::int64_t{1} << 40)) {
      throw VerifyError("{}: bad NPY shape ({})", path.string(), shape);
    }
    npy.shape.push_back(d);
    if (d != 0 && total > b.size() / static_cast<std::uint64_t>(d)) {
      throw VerifyError("{}: NPY shape ({}) needs more data than the file has: truncated or corrupt", path.string(),
                        shape);
    }
    total *= static_cast<std::uint64_t>(d);
  }
  std::size_t elem = 0;
  if (npy.descr.size() >= 3 && (npy.descr[0] == '<' || npy.descr[0] == '|')) {
    elem = static_cast<std::size_t>(std::atoi(npy.descr.c_str() + 2));
  }
  if (elem == 0) {
    throw Error("{}: NPY dtype {} is not supported (use little-endian float32/float64/int/uint)", path.string(),
                npy.descr);
  }
  if (b.size() - npy.offset != total * elem) {
    throw VerifyError("{}: NPY data has {} bytes where the shape needs {}: truncated or corrupt", path.string(),
                      b.size() - npy.offset, total * elem);
  }
  return npy;
}

template<typename T>
T
load_le(const std::byte* p)
{
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Element `i` of a NPY array as double; supports f4, f8, i1-i8, u1-u8, b1.
double
npy_value(const Npy& npy, std::size_t i)
{
  const auto* base = npy.bytes.data() + npy.offset;
  const char kind = npy.descr[1];
  const auto size = static_cast<std::size_t>(std::atoi(npy.descr.c_str() + 2));
  const auto* p = base + i * size;
  if (kind == 'f' && size == 4)
    return load_le<float>(p);
  if (kind == 'f' && size == 8)
    return load_le<double>(p);
  if (kind == 'i' && size == 1)
    return load_le<std::int8_t>(p);
  if (kind == 'i' && size == 2)
    return load_le<std::int16_t>(p);
  if (kind == 'i' && size == 4)
    return load_le<std::int32_t>(p);
  if (kind == 'i' && size == 8)
    return static_cast<double>(load_le<std::int64_t>(p));
  if ((kind == 'u' || kind == 'b') && size == 1)
    return load_le<std::uint8_t>(p);
  if (kind == 'u' && size == 2)
    return load_le<std::uint16_t>(p);
  if (kind == 'u' && size == 4)
    return load_le<std::uint32_t>(p);
  if (kind == 'u' && size == 8)
    return static_cast<double>(load_le<std::uint64_t>(p));
  throw Error("NPY dtype {} is not supported", npy.descr);
}

Dataset
load_npy(const DataOptions& opt)
{
  const auto labels_path = labels_file(opt, npy_label_names);
  const auto x = read_npy(opt.path);
  const auto y = read_npy(labels_path);
  if (x.shape.empty() || x.shape[0] == 0) {
    throw Error("{}: the features array is empty or zero-dimensional", opt.path.string());
  }
  if (y.shape.size() != 1 || y.shape[0] != x.shape[0]) {
    throw Error("{}: labels must be a 1-D array of {} entries (one per row of {}), found shape ({})",
                labels_path.string(), x.shape[0], opt.path.string(), fmt::join(y.shape, ","));
  }
  Dataset ds;
  ds.format = DataFormat::npy;
  ds.source = opt.path;
  ds.sample_shape.assign(x.shape.begin() + 1, x.shape.end());
  if (ds.sample_shape.empty()) {
    ds.sample_shape = {1};
  }
  check_sample_shape(ds.sample_shape, opt.path);
  const auto n = std::min<std::size_t>(static_cast<std::size_t>(x.shape[0]), opt.limit.value_or(SIZE_MAX));
  const auto numel = ds.sample_numel();
  ds.features.resize(n * numel);
  for (std::size_t i = 0; i < n * numel; ++i) {
    const double v = npy_value(x, i);
    if (!fits_float(v)) {
      throw Error("{}: sample {}, feature {}: {} is not a finite number in the range of a 32-bit float",
                  opt.path.string(), i / numel, i % numel, v);
    }
    ds.features[i] = static_cast<float>(v);
  }
  ds.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double v = npy_value(y, i);
    if (!is_class_index(v)) {
      throw Error("{}: sample {}: label {} is not a class index (0, 1, 2, ...)", labels_path.string(), i, v);
    }
    ds.labels[i] = static_cast<std::int64_t>(v);
  }
  return ds;
}

} // namespace

std::size_t
Dataset::sample_numel() const noexcept
{
  std::size_t n = 1;
  for (const auto d : sample_shape) {
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

std::string
Dataset::where(std::size_t index) const
{
  if (index < lines.size()) {
    return fmt::format("{}: line {}", source.string(), lines[index]);
  }
  return fmt::format("{}: sample {}", source.string(), index);
}

std::int64_t
Dataset::num_classes() const noexcept
{
  std::int64_t m = -1;
  for (const auto l : labels) {
    m = std::max(m, l);
  }
  return m + 1;
}

std::string
Dataset::shape_string() const
{
  return shape_to_string(sample_shape);
}

std::string
shape_to_string(const std::vector<std::int64_t>& shape)
{
  return fmt::format("{}", fmt::join(shape, ","));
}

std::vector<std::int64_t>
parse_shape(const std::string& text, const std::string& what)
{
  std::vector<std::int64_t> shape;
  for (auto cell : split_commas(text)) {
    std::int64_t d = 0;
    const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), d);
    if (ec != std::errc{} || p != cell.data() + cell.size() || d <= 0 || d > (1 << 24)) {
      throw UsageError("{}: '{}' is not a shape like 64 or 1,28,28", what, text);
    }
    shape.push_back(d);
  }
  return shape;
}

DataFormat
detect_format(const fs::path& path)
{
  auto name = path.filename().string();
  if (ends_with(name, ".gz")) {
    name.resize(name.size() - 3);
  }
  if (ends_with(name, ".csv")) {
    return DataFormat::csv;
  }
  if (ends_with(name, ".npy")) {
    return DataFormat::npy;
  }
  if (ends_with(name, "-ubyte") || ends_with(name, ".idx") || name.find("idx") != std::string::npos) {
    return DataFormat::idx;
  }
  throw UsageError("{}: unknown data format; fedl reads .csv, .csv.gz, .npy and IDX files "
                   "(names ending in -ubyte or .idx, gzip or not)",
                   path.string());
}

std::vector<fs::path>
dataset_files(const DataOptions& options)
{
  std::vector<fs::path> files{options.path};
  try {
    const auto format = detect_format(options.path);
    if (format != DataFormat::csv) {
      files.push_back(labels_file(options, format == DataFormat::idx ? idx_label_names : npy_label_names));
    }
  } catch (const Error&) {
    // No labels file beside it: load_dataset says so, inside the sandbox as outside.
  }
  return files;
}

Dataset
load_dataset(const DataOptions& options)
{
  Dataset ds;
  switch (detect_format(options.path)) {
  case DataFormat::csv:
    ds = load_csv(options);
    break;
  case DataFormat::idx:
    ds = load_idx(options);
    break;
  case DataFormat::npy:
    ds = load_npy(options);
    break;
  }
  apply_limit(ds, options.limit);
  if (ds.size() == 0) {
    throw Error("{}: no samples to use", options.path.string());
  }
  return ds;
}

} // namespace fedl::core
