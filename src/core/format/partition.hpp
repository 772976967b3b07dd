// SPDX-License-Identifier: Apache-2.0
// Splitting one data set into per-site shards for simulations (`fedl init --partition DATA
// --split S [--holdout F] --clients N --seed X`, DESIGN §9 "Partition output"), and writing each
// shard in the input's own format.
//
// Splits:
//   iid             the samples shuffled and dealt out evenly (site sizes differ by at most 1).
//   dirichlet:ALPHA label skew after Hsu, Qi and Brown (2019), "Measuring the Effects of
//                   Non-Identical Data Distribution for Federated Visual Classification": for
//                   each class, proportions over the sites are drawn from a symmetric Dirichlet
//                   distribution Dir(ALPHA) and the class's samples are split accordingly. Small
//                   ALPHA (0.1) gives each site few classes; large ALPHA (100) is close to iid.
//   shards:K        pathological label skew after McMahan et al. (2017), "Communication-Efficient
//                   Learning of Deep Networks from Decentralized Data": the samples sorted by
//                   label are cut into sites×K equal shards and each site gets K of them at
//                   random, so a site sees at most 2K classes when shards are no larger than the
//                   smallest class.
//
// Determinism: everything is drawn from one std::mt19937_64 seeded with the seed (whose output
// the C++ standard fixes). Shuffles and bounded integers are computed here rather than with
// std::shuffle and std::uniform_int_distribution, whose algorithms the standard leaves to the
// library; the Dirichlet draws use std::gamma_distribution, so they repeat exactly for a given
// standard library (libstdc++) and math library, on any machine.
#pragma once

#include "core/format/dataset.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fedl::core {

enum class SplitKind
{
  iid,
  dirichlet,
  shards
};

struct SplitSpec
{
  SplitKind kind = SplitKind::iid;
  double alpha = 0;                // dirichlet: the concentration, > 0
  std::size_t shards_per_site = 0; // shards: K >= 1

  // The canonical spelling, which parse_split() reads back: "iid", "dirichlet:0.5", "shards:2".
  std::string to_string() const;
};

// Parses `iid`, `dirichlet:ALPHA` (a finite ALPHA > 0) or `shards:K` (an integer K >= 1).
// Throws UsageError (exit 2) naming the spec and the valid forms.
SplitSpec parse_split(const std::string& text);

// The sample indices of each of `sites` sites, each list ascending (input order), together a
// permutation of 0 .. labels.size()-1. Every site gets at least one sample.
//
// dirichlet: the whole set of class proportions is drawn again (up to 100 times) until every
// site has a sample; if no draw manages it (many sites, few classes, small ALPHA), the draw with
// the fewest empty sites is kept and each empty site takes one sample from the then largest
// site, of that site's most frequent class, which keeps the skew of the draw almost intact.
//
// Throws UsageError (exit 2) if `sites` is 0, if there are fewer samples than sites, or for
// shards:K if there are fewer samples than sites×K (a shard would be empty). Labels are class
// indices (>= 0); any values work, they are only compared.
std::vector<std::vector<std::size_t>> partition_indices(const std::vector<std::int64_t>& labels, std::size_t sites,
                                                        const SplitSpec& spec, std::uint64_t seed);

// A held-out set taken out before partitioning. Both lists ascending; together a permutation
// of 0 .. labels.size()-1.
struct HoldoutSplit
{
  std::vector<std::size_t> train;
  std::vector<std::size_t> holdout;
};

// Takes round(fraction × samples) samples out, stratified by class: each class gives the floor
// of its proportional share of that total, and the rest goes one each to the classes with the
// largest fractional parts (ties to the smaller label); which samples of a class go is random.
// A fraction > 0 holds out at least one sample and always leaves one for training.
// The draws come from a stream derived from `seed` that differs from partition_indices()'s.
// Throws UsageError (exit 2) if `fraction` is not in [0, 1), or is > 0 with fewer than 2 samples.
HoldoutSplit split_holdout(const std::vector<std::int64_t>& labels, double fraction, std::uint64_t seed);

struct Partition
{
  std::vector<std::vector<std::size_t>> sites; // indices into the data set, each list ascending
  std::vector<std::size_t> holdout;            // ascending; empty without a holdout
};

// split_holdout() then partition_indices() on the remaining samples, with indices mapped back
// to the whole data set. With `holdout_fraction` 0 the sites are exactly partition_indices()'s.
// Throws UsageError as those two do (the sites are counted against the training samples).
Partition make_partition(const std::vector<std::int64_t>& labels, std::size_t sites, const SplitSpec& spec,
                         double holdout_fraction, std::uint64_t seed);

// What one site (or the holdout) received, for `fedl init` to print.
struct SubsetSummary
{
  std::size_t samples = 0;
  std::vector<std::pair<std::int64_t, std::size_t>> class_counts; // (label, count), ascending, no zeros
};

// Counts the labels of `indices`. Throws std::out_of_range for an index past the end of `labels`.
SubsetSummary summarize(const std::vector<std::int64_t>& labels, std::span<const std::size_t> indices);

// "450 samples, 3 classes: 0=12 1=40 7=398".
std::string format_summary(const SubsetSummary& summary);

// Which set a written subset is; it picks the file names: train.csv or test.csv for CSV input,
// train-/test-images-idx3-ubyte.gz and train-/test-labels-idx1-ubyte.gz for IDX input (the
// MNIST names, kept for any number of image dimensions; the IDX header has the real ones).
enum class SubsetRole
{
  train,
  test
};

// Throws UsageError (exit 2) unless `path` is CSV or IDX data, so that `init` can refuse NPY
// (and unknown names) before loading anything: "--partition takes CSV or IDX data".
void require_partitionable(const std::filesystem::path& path);

// Writes subsets of a loaded data set in the input's own format. The constructor reads the
// input file again (gunzipped) and keeps it, so that each write copies the original bytes:
//   CSV: the header row if the input had one (options.header), then each selected sample's
//        line exactly as it is in the input (numbers are not reformatted; a CRLF line keeps its
//        CR), in the order of `indices`, one per line; uncompressed, whatever the input was.
//   IDX: the original header with the sample count replaced and the selected images' bytes,
//        and a one-dimensional IDX labels file from the data set's labels; both gzip-compressed
//        (zlib, no file name or time stamp in the gzip header, so equal inputs give equal files).
class SubsetWriter
{
public:
  // `data` is what load_dataset(options) returned and must outlive the writer. Throws
  // UsageError (exit 2) for NPY input, Error (exit 1) if the file cannot be read or no longer
  // matches `data` (changed since it was loaded), VerifyError (exit 3) for corrupt gzip.
  SubsetWriter(const Dataset& data, const DataOptions& options);
  // Not copyable (it keeps views into its own buffer); moving keeps the buffer and the views.
  SubsetWriter(const SubsetWriter&) = delete;
  SubsetWriter& operator=(const SubsetWriter&) = delete;
  SubsetWriter(SubsetWriter&&) noexcept = default;
  SubsetWriter& operator=(SubsetWriter&&) noexcept = default;
  ~SubsetWriter() = default;

  // Writes the samples `indices` (into `data`) to `dir`, creating the folder if needed, each
  // file atomically (atomic_write). Returns the paths written. Throws Error (exit 1) naming the
  // path if a folder or file cannot be written, std::out_of_range for an index past the data.
  std::vector<std::filesystem::path> write(std::span<const std::size_t> indices, const std::filesystem::path& dir,
                                           SubsetRole role) const;

private:
  std::vector<std::filesystem::path> write_csv(std::span<const std::size_t> indices, const std::filesystem::path& dir,
                                               SubsetRole role) const;
  std::vector<std::filesystem::path> write_idx(std::span<const std::size_t> indices, const std::filesystem::path& dir,
                                               SubsetRole role) const;

  const Dataset* m_data;
  bool m_header = true;
  std::vector<std::byte> m_raw;                 // the decompressed input file
  std::string_view m_header_line;               // CSV with a header: its line, as in m_raw
  std::vector<std::string_view> m_sample_lines; // CSV: each sample's line, as in m_raw
  std::vector<std::uint32_t> m_idx_dims;        // IDX: the image file's dimensions
  std::size_t m_idx_offset = 0;                 // IDX: where the image bytes start in m_raw
};

} // namespace fedl::core
