// SPDX-License-Identifier: Apache-2.0
// Loading a site's training data (CSV, IDX, NPY) into one float feature matrix and int64
// labels, without LibTorch. The backend receives the result as plain buffers.
//
// Scaling: CSV and NPY features are used as they are; IDX unsigned bytes become x / 255 in
// [0, 1] (the usual MNIST convention, and what torchvision's ToTensor does).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedl::core {

enum class DataFormat
{
  csv,
  idx,
  npy
};

struct DataOptions
{
  std::filesystem::path path;
  std::optional<std::filesystem::path> labels; // IDX and NPY: the labels file, else found beside
  std::optional<std::string> label_column;     // CSV: a header name or a 0-based index
  // CSV: whether the first row names the columns. None: it should, and a first row of numbers
  // only is refused as ambiguous (it may be data) rather than silently dropped.
  std::optional<bool> header;
  std::optional<std::size_t> limit; // keep only the first N samples
};

struct Dataset
{
  std::vector<float> features;            // size() * sample_numel(), row-major
  std::vector<std::int64_t> labels;       // one per sample
  std::vector<std::int64_t> sample_shape; // e.g. {64} or {1, 28, 28}
  DataFormat format = DataFormat::csv;
  std::filesystem::path source;
  std::vector<std::uint32_t> lines; // CSV: the file line of each sample (1-based)
  std::vector<std::string> columns; // CSV with a header: every column's name, in file order

  std::size_t size() const noexcept { return labels.size(); }
  std::size_t sample_numel() const noexcept;
  // "line 17" for CSV, "sample 17" (0-based) for the others; for error messages.
  std::string where(std::size_t index) const;
  // The largest label + 1 (0 for an empty set).
  std::int64_t num_classes() const noexcept;
  // "64" or "1,28,28", as fedl.input_shape spells it.
  std::string shape_string() const;
};

// The format from the file name: .csv / .csv.gz, .npy, or IDX (`-ubyte` or `.idx`, gzip or not).
// Throws UsageError naming the file if it cannot tell.
DataFormat detect_format(const std::filesystem::path& path);

// The files load_dataset(options) reads: the data file and, for IDX and NPY, its labels file
// (given, or the one found beside it if it exists). For the sandbox's read-only paths.
std::vector<std::filesystem::path> dataset_files(const DataOptions& options);

// Loads the data set. Throws Error (exit 1) naming the file and place for unreadable files and
// bad content (a non-numeric or NaN cell names its line and column; a negative label), and
// VerifyError (exit 3) for a corrupt gzip stream or a truncated IDX or NPY file; UsageError
// for an unknown label column, and for a CSV whose header row is all numbers when the options
// do not say whether it has one.
Dataset load_dataset(const DataOptions& options);

// Parses "64" or "1,28,28" (positive integers). Throws UsageError naming `what`.
std::vector<std::int64_t> parse_shape(const std::string& text, const std::string& what);
std::string shape_to_string(const std::vector<std::int64_t>& shape);

} // namespace fedl::core
