// SPDX-License-Identifier: Apache-2.0
#include "core/format/dataset.hpp"
#include "core/format/partition.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>

using namespace fedl::core;
using fedl::test::read_file;
using fedl::test::TempDir;
using fedl::test::write_file;
namespace fs = std::filesystem;

namespace {

using Sites = std::vector<std::vector<std::size_t>>;

// `classes` classes of `per_class` samples each, sorted by label (0 0 0 1 1 1 ...), which is
// the hardest order for a split that ignores labels.
std::vector<std::int64_t>
sorted_labels(std::size_t classes, std::size_t per_class)
{
  std::vector<std::int64_t> labels;
  for (std::size_t c = 0; c < classes; ++c) {
    labels.insert(labels.end(), per_class, static_cast<std::int64_t>(c));
  }
  return labels;
}

// Checks that the sites and the holdout hold every sample exactly once, each list ascending,
// and that no site is empty.
void
check_cover(const Sites& sites, const std::vector<std::size_t>& holdout, std::size_t samples)
{
  std::vector<int> seen(samples, 0);
  for (const auto& site : sites) {
    CHECK_FALSE(site.empty());
    CHECK(std::is_sorted(site.begin(), site.end()));
    for (const auto i : site) {
      REQUIRE(i < samples);
      ++seen[i];
    }
  }
  CHECK(std::is_sorted(holdout.begin(), holdout.end()));
  for (const auto i : holdout) {
    REQUIRE(i < samples);
    ++seen[i];
  }
  CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
}

// The share of its most frequent class in each site, averaged over the sites.
double
mean_max_class_share(const std::vector<std::int64_t>& labels, const Sites& sites)
{
  double total = 0;
  for (const auto& site : sites) {
    const auto summary = summarize(labels, site);
    std::size_t largest = 0;
    for (const auto& [label, count] : summary.class_counts) {
      largest = std::max(largest, count);
    }
    total += static_cast<double>(largest) / static_cast<double>(site.size());
  }
  return total / static_cast<double>(sites.size());
}

std::string
usage_error_of(const std::function<void()>& fn)
{
  try {
    fn();
  } catch (const UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not a usage error) ") + e.what();
  }
  return "(no error)";
}

std::string
be32(std::uint32_t v)
{
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}

// The lines of `text`, without their '\n'.
std::vector<std::string>
lines_of(const std::string& text)
{
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    lines.push_back(line);
  }
  return lines;
}

// Checks that `shard` holds the samples `indices` of `all`, in that order.
void
check_same_samples(const Dataset& shard, const Dataset& all, const std::vector<std::size_t>& indices)
{
  REQUIRE(shard.size() == indices.size());
  REQUIRE(shard.sample_shape == all.sample_shape);
  const auto numel = all.sample_numel();
  for (std::size_t k = 0; k < indices.size(); ++k) {
    CHECK(shard.labels[k] == all.labels[indices[k]]);
    const auto* a = shard.features.data() + k * numel;
    const auto* b = all.features.data() + indices[k] * numel;
    CHECK(std::equal(a, a + numel, b));
  }
}

DataOptions
csv_options(const fs::path& path, bool header)
{
  DataOptions o;
  o.path = path;
  o.header = header;
  return o;
}

const SplitSpec k_iid = parse_split("iid");

} // namespace

TEST_SUITE_BEGIN("partition");

TEST_CASE("core::parse_split reads iid, dirichlet:ALPHA and shards:K and spells them back")
{
  CHECK(parse_split("iid").kind == SplitKind::iid);
  const auto d = parse_split("dirichlet:0.5");
  CHECK(d.kind == SplitKind::dirichlet);
  CHECK(d.alpha == 0.5);
  CHECK(d.to_string() == "dirichlet:0.5");
  CHECK(parse_split("dirichlet:1e-3").alpha == 0.001);
  CHECK(parse_split("dirichlet:100").to_string() == "dirichlet:100");
  const auto s = parse_split("shards:2");
  CHECK(s.kind == SplitKind::shards);
  CHECK(s.shards_per_site == 2);
  CHECK(s.to_string() == "shards:2");
  CHECK(parse_split("iid").to_string() == "iid");
  for (const auto* text : {"iid", "dirichlet:0.1", "dirichlet:0.3333", "shards:1", "shards:17"}) {
    CHECK(parse_split(parse_split(text).to_string()).to_string() == text);
  }
}

TEST_CASE("core::parse_split rejects bad specs, naming the spec and the valid forms")
{
  for (const std::string text : {"",
                                 "IID",
                                 "iid:1",
                                 "random",
                                 "dirichlet",
                                 "dirichlet:",
                                 "dirichlet:0",
                                 "dirichlet:-1",
                                 "dirichlet:nan",
                                 "dirichlet:inf",
                                 "dirichlet:0.5x",
                                 "dirichlet: 0.5",
                                 "dirichlet:1e999",
                                 "shards",
                                 "shards:",
                                 "shards:0",
                                 "shards:-1",
                                 "shards:1.5",
                                 "shards:2x",
                                 "shards:99999999999999999999999",
                                 "label:2",
                                 ":2"}) {
    CAPTURE(text);
    const auto message = usage_error_of([&] { (void)parse_split(text); });
    CHECK(message.find("--split '" + text + "'") != std::string::npos);
    CHECK(message.find("iid, dirichlet:ALPHA") != std::string::npos);
    CHECK(message.find("shards:K") != std::string::npos);
  }
}

TEST_CASE("core::partition_indices is deterministic: the same seed gives the same split, another seed another")
{
  const auto labels = sorted_labels(5, 40);
  for (const auto* text : {"iid", "dirichlet:0.5", "shards:2"}) {
    CAPTURE(text);
    const auto spec = parse_split(text);
    const auto a = partition_indices(labels, 4, spec, 7);
    const auto b = partition_indices(labels, 4, spec, 7);
    const auto c = partition_indices(labels, 4, spec, 8);
    CHECK(a == b);
    CHECK(a != c);
    check_cover(a, {}, labels.size());
    check_cover(c, {}, labels.size());

    const auto pa = make_partition(labels, 4, spec, 0.25, 7);
    const auto pb = make_partition(labels, 4, spec, 0.25, 7);
    const auto pc = make_partition(labels, 4, spec, 0.25, 8);
    CHECK(pa.sites == pb.sites);
    CHECK(pa.holdout == pb.holdout);
    CHECK(pa.holdout != pc.holdout);
    CHECK(pa.sites != pc.sites);
  }
}

TEST_CASE("core::partition_indices iid deals evenly: site sizes differ by at most one")
{
  const auto labels = sorted_labels(3, 34); // 102 samples
  for (const std::size_t sites : {1, 2, 5, 7, 102}) {
    CAPTURE(sites);
    const auto parts = partition_indices(labels, sites, k_iid, 1);
    REQUIRE(parts.size() == sites);
    check_cover(parts, {}, labels.size());
    std::size_t lo = labels.size();
    std::size_t hi = 0;
    for (const auto& p : parts) {
      lo = std::min(lo, p.size());
      hi = std::max(hi, p.size());
    }
    CHECK(hi - lo <= 1);
  }
  // A shuffle, not blocks in input order: with sorted labels, each of 3 sites sees every class.
  for (const auto& site : partition_indices(labels, 3, k_iid, 3)) {
    CHECK(summarize(labels, site).class_counts.size() == 3);
  }
}

TEST_CASE("core::partition_indices dirichlet: small alpha is strongly skewed, large alpha close to iid")
{
  const auto labels = sorted_labels(10, 200);
  for (const std::uint64_t seed : {1, 2, 3}) {
    CAPTURE(seed);
    const auto skewed = partition_indices(labels, 10, parse_split("dirichlet:0.1"), seed);
    check_cover(skewed, {}, labels.size());
    CHECK(mean_max_class_share(labels, skewed) > 0.5);

    const auto even = partition_indices(labels, 10, parse_split("dirichlet:100"), seed);
    check_cover(even, {}, labels.size());
    // iid would give 0.1 here; Dir(100) proportions over 10 sites vary by about 0.01.
    CHECK(mean_max_class_share(labels, even) < 0.2);
    for (const auto& site : even) {
      CHECK(summarize(labels, site).class_counts.size() == 10);
      CHECK(site.size() > 150);
      CHECK(site.size() < 250);
    }
  }
}

TEST_CASE("core::partition_indices dirichlet gives every site a sample even when draws leave sites empty")
{
  // 3 classes over 40 sites with alpha 0.01: nearly every class lands on one site, so no draw
  // serves every site and the fallback moves samples.
  const auto labels = sorted_labels(3, 20);
  for (const std::uint64_t seed : {1, 2, 3, 4}) {
    CAPTURE(seed);
    const auto parts = partition_indices(labels, 40, parse_split("dirichlet:0.01"), seed);
    REQUIRE(parts.size() == 40);
    check_cover(parts, {}, labels.size());
    CHECK(parts == partition_indices(labels, 40, parse_split("dirichlet:0.01"), seed));
  }
  // As many sites as samples: one each.
  const auto one_each = partition_indices(labels, labels.size(), parse_split("dirichlet:0.3"), 5);
  check_cover(one_each, {}, labels.size());
  for (const auto& site : one_each) {
    CHECK(site.size() == 1);
  }
  // A tiny alpha whose gamma draws underflow still works.
  check_cover(partition_indices(labels, 4, parse_split("dirichlet:1e-300"), 6), {}, labels.size());
}

TEST_CASE("core::partition_indices shards: K equal shards of sorted data per site, at most 2K classes")
{
  const auto labels = sorted_labels(10, 100);
  for (const std::size_t k : {1, 2, 3}) {
    CAPTURE(k);
    for (const std::uint64_t seed : {1, 2}) {
      const auto parts = partition_indices(labels, 10, parse_split(fmt::format("shards:{}", k)), seed);
      REQUIRE(parts.size() == 10);
      check_cover(parts, {}, labels.size());
      for (const auto& site : parts) {
        CHECK(summarize(labels, site).class_counts.size() <= 2 * k);
        // 1000 samples in 10·k shards: sizes differ by at most 1 per shard.
        CHECK(site.size() >= k * (1000 / (10 * k)));
        CHECK(site.size() <= k * (1000 / (10 * k) + 1));
      }
    }
  }
  // Shards of the size of a class: each site gets exactly K classes.
  for (const auto& site : partition_indices(labels, 5, parse_split("shards:2"), 9)) {
    CHECK(site.size() == 200);
    CHECK(summarize(labels, site).class_counts.size() == 2);
  }
  // Every shard non-empty at the limit of one sample per shard.
  check_cover(partition_indices(sorted_labels(2, 6), 3, parse_split("shards:4"), 1), {}, 12);
}

TEST_CASE("core::partition_indices refuses what cannot give every site a sample")
{
  const auto labels = sorted_labels(2, 5);
  CHECK(usage_error_of([&] { (void)partition_indices(labels, 0, k_iid, 1); }).find("--clients") != std::string::npos);
  CHECK(usage_error_of([&] { (void)partition_indices(labels, 11, k_iid, 1); }).find("only 10 samples") !=
        std::string::npos);
  CHECK(usage_error_of([&] {
          (void)partition_indices(labels, 11, parse_split("dirichlet:1"), 1);
        }).find("only 10 samples") != std::string::npos);
  CHECK(usage_error_of([&] { (void)partition_indices(labels, 3, parse_split("shards:4"), 1); }).find("shards:4") !=
        std::string::npos);
  CHECK(usage_error_of([&] { (void)partition_indices({}, 1, k_iid, 1); }).find("only 0 samples") != std::string::npos);
  SplitSpec bad;
  bad.kind = SplitKind::dirichlet; // alpha 0
  CHECK(usage_error_of([&] { (void)partition_indices(labels, 2, bad, 1); }).find("dirichlet") != std::string::npos);
}

TEST_CASE("core::split_holdout takes a stratified, seeded fraction out before partitioning")
{
  const auto labels = sorted_labels(10, 50);
  const auto split = split_holdout(labels, 0.2, 3);
  CHECK(split.holdout.size() == 100);
  CHECK(split.train.size() == 400);
  for (const auto& [label, count] : summarize(labels, split.holdout).class_counts) {
    CHECK(count == 10);
  }
  CHECK(split_holdout(labels, 0.2, 3).holdout == split.holdout);
  CHECK(split_holdout(labels, 0.2, 4).holdout != split.holdout);

  // Unequal classes: the total is round(F × n), shared by the classes in proportion.
  std::vector<std::int64_t> uneven = sorted_labels(1, 7);
  uneven.insert(uneven.end(), 13, 1);
  const auto u = split_holdout(uneven, 0.25, 1);
  CHECK(u.holdout.size() == 5);
  const auto counts = summarize(uneven, u.holdout).class_counts;
  REQUIRE(counts.size() == 2);
  CHECK(counts[0].second + counts[1].second == 5);
  CHECK(counts[0].second >= 1);
  CHECK(counts[0].second <= 2);

  // A small positive fraction holds out one sample; a large one leaves one for training.
  CHECK(split_holdout(sorted_labels(1, 10), 0.01, 1).holdout.size() == 1);
  CHECK(split_holdout(sorted_labels(1, 10), 0.99, 1).train.size() == 1);
  CHECK(split_holdout(labels, 0, 1).holdout.empty());

  for (const double f : {-0.1, 1.0, 1.5, std::nan("")}) {
    CAPTURE(f);
    CHECK(usage_error_of([&] { (void)split_holdout(labels, f, 1); }).find("--holdout") != std::string::npos);
  }
  CHECK(usage_error_of([&] { (void)split_holdout({3}, 0.5, 1); }).find("--holdout") != std::string::npos);
}

TEST_CASE("core::make_partition covers every sample once across the sites and the holdout")
{
  const auto labels = sorted_labels(4, 25);
  for (const auto* text : {"iid", "dirichlet:0.2", "shards:2"}) {
    CAPTURE(text);
    const auto spec = parse_split(text);
    const auto p = make_partition(labels, 5, spec, 0.2, 11);
    CHECK(p.holdout.size() == 20);
    check_cover(p.sites, p.holdout, labels.size());
    // Without a holdout it is partition_indices().
    const auto q = make_partition(labels, 5, spec, 0, 11);
    CHECK(q.holdout.empty());
    CHECK(q.sites == partition_indices(labels, 5, spec, 11));
  }
  // The sites are counted against the samples left after the holdout.
  const auto message = usage_error_of([&] { (void)make_partition(sorted_labels(1, 10), 9, k_iid, 0.2, 1); });
  CHECK(message.find("after --holdout") != std::string::npos);
}

TEST_CASE("core::summarize counts each site's samples and classes")
{
  const std::vector<std::int64_t> labels{3, 0, 3, 7, 3, 0};
  const std::vector<std::size_t> site{0, 2, 3, 5};
  const auto s = summarize(labels, site);
  CHECK(s.samples == 4);
  CHECK(s.class_counts == std::vector<std::pair<std::int64_t, std::size_t>>{{0, 1}, {3, 2}, {7, 1}});
  CHECK(format_summary(s) == "4 samples, 3 classes: 0=1 3=2 7=1");
  const std::vector<std::size_t> one{1};
  CHECK(format_summary(summarize(labels, one)) == "1 sample, 1 class: 0=1");
  CHECK(format_summary(SubsetSummary{}) == "0 samples, 0 classes");
}

TEST_CASE("core::SubsetWriter writes CSV shards with the header and the original line text")
{
  TempDir dir;
  // Numbers in several spellings, a blank line, a CRLF line, spaces: all must come back verbatim.
  const std::string header = "f1, f2 ,label";
  std::string csv = header + "\n";
  const std::vector<std::string> rows{"1.50,2e0,0", "0.1, -3 ,1", "7,8,2\r", "1e-1,0.000,0", "5,6,1",
                                      "9,9,2",      "4.25,1,0",   "3,3,1",   "2,2,2",        "0,0,0"};
  for (std::size_t i = 0; i < rows.size(); ++i) {
    csv += rows[i] + "\n";
    if (i == 3) {
      csv += "\n";
    }
  }
  write_file(dir / "in.csv", csv);
  const auto options = csv_options(dir / "in.csv", true);
  const auto all = load_dataset(options);
  REQUIRE(all.size() == 10);

  const auto p = make_partition(all.labels, 3, k_iid, 0.3, 5);
  const SubsetWriter writer(all, options);
  for (std::size_t s = 0; s < p.sites.size(); ++s) {
    const auto site_dir = dir / fmt::format("clients/site-{}/data", s + 1);
    const auto written = writer.write(p.sites[s], site_dir, SubsetRole::train);
    REQUIRE(written.size() == 1);
    CHECK(written[0] == site_dir / "train.csv");
    const auto text = read_file(written[0]);
    const auto lines = lines_of(text);
    REQUIRE(lines.size() == p.sites[s].size() + 1);
    CHECK(lines[0] == header);
    for (std::size_t k = 0; k < p.sites[s].size(); ++k) {
      CHECK(lines[k + 1] == rows[p.sites[s][k]]);
    }
    check_same_samples(load_dataset(csv_options(written[0], true)), all, p.sites[s]);
  }
  const auto test_files = writer.write(p.holdout, dir / "data", SubsetRole::test);
  REQUIRE(test_files.size() == 1);
  CHECK(test_files[0] == dir / "data" / "test.csv");
  CHECK(lines_of(read_file(test_files[0]))[0] == header);
  check_same_samples(load_dataset(csv_options(test_files[0], true)), all, p.holdout);
  // No temporary files are left behind.
  CHECK(std::distance(fs::directory_iterator(dir / "data"), fs::directory_iterator{}) == 1);
}

TEST_CASE("core::SubsetWriter keeps header-less (--no-header) CSV header-less, and writes gzip input as plain CSV")
{
  TempDir dir;
  const std::string csv = "0.5,1,1\n2,3,0\n4,5,1\n6,7,0\n8,9,1\n";
  write_file(dir / "plain.csv", csv);
  const auto options = csv_options(dir / "plain.csv", false);
  const auto all = load_dataset(options);
  REQUIRE(all.size() == 5);
  const std::vector<std::size_t> pick{1, 3, 4};
  const auto written = SubsetWriter(all, options).write(pick, dir / "out", SubsetRole::train);
  CHECK(read_file(written[0]) == "2,3,0\n6,7,0\n8,9,1\n");
  check_same_samples(load_dataset(csv_options(written[0], false)), all, pick);

  // A header-less file whose first line would be taken as a header: all rows stay data.
  const std::vector<std::size_t> first{0};
  CHECK(read_file(SubsetWriter(all, options).write(first, dir / "first", SubsetRole::test)[0]) == "0.5,1,1\n");
}

TEST_CASE("core::SubsetWriter refuses a CSV that changed since it was loaded, and NPY input")
{
  TempDir dir;
  write_file(dir / "d.csv", "a,b\n1,0\n2,1\n3,0\n");
  const auto options = csv_options(dir / "d.csv", true);
  const auto all = load_dataset(options);
  write_file(dir / "d.csv", "a,b\n1,0\n");
  try {
    const SubsetWriter writer(all, options);
    FAIL("no error");
  } catch (const UsageError&) {
    FAIL("a usage error");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::failure);
    CHECK(std::string(e.what()).find("no longer matches") != std::string::npos);
  }

  const auto npy = usage_error_of([&] { require_partitionable(dir / "x.npy"); });
  CHECK(npy.find("--partition takes CSV or IDX data") != std::string::npos);
  Dataset fake;
  fake.format = DataFormat::npy;
  DataOptions npy_options;
  npy_options.path = dir / "features.npy";
  const auto npy_writer = usage_error_of([&] { const SubsetWriter w(fake, npy_options); });
  CHECK(npy_writer.find("--partition takes CSV or IDX data") != std::string::npos);
  CHECK(usage_error_of([&] { require_partitionable(dir / "x.csv"); }) == "(no error)");
  CHECK(usage_error_of([&] { require_partitionable(dir / "t10k-images-idx3-ubyte.gz"); }) == "(no error)");
}

TEST_CASE("core::SubsetWriter writes IDX shards as gzip files that load back to the same images and labels")
{
  TempDir dir;
  // 12 images of 2×3 bytes; image i holds the bytes 10i .. 10i+5, label i % 4.
  constexpr std::uint32_t n = 12;
  std::string images = std::string("\0\0\x08\x03", 4) + be32(n) + be32(2) + be32(3);
  std::string labels = std::string("\0\0\x08\x01", 4) + be32(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    for (std::uint32_t b = 0; b < 6; ++b) {
      images += static_cast<char>(10 * i + b);
    }
    labels += static_cast<char>(i % 4);
  }
  write_file(dir / "all-images-idx3-ubyte", images);
  write_file(dir / "all-labels-idx1-ubyte", labels);
  DataOptions options;
  options.path = dir / "all-images-idx3-ubyte";
  const auto all = load_dataset(options);
  REQUIRE(all.size() == n);

  const auto p = make_partition(all.labels, 2, parse_split("shards:2"), 0.25, 3);
  const SubsetWriter writer(all, options);
  for (std::size_t s = 0; s < p.sites.size(); ++s) {
    const auto site_dir = dir / fmt::format("site-{}", s + 1);
    const auto written = writer.write(p.sites[s], site_dir, SubsetRole::train);
    REQUIRE(written.size() == 2);
    CHECK(written[0] == site_dir / "train-images-idx3-ubyte.gz");
    CHECK(written[1] == site_dir / "train-labels-idx1-ubyte.gz");
    for (const auto& f : written) {
      const auto raw = read_file(f);
      REQUIRE(raw.size() > 2);
      CHECK(raw.substr(0, 2) == "\x1f\x8b");
    }
    // The images keep their original bytes after a header with the new count.
    const auto bytes = read_maybe_gzip(written[0]);
    const std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    const auto count = static_cast<std::uint32_t>(p.sites[s].size());
    std::string expected = std::string("\0\0\x08\x03", 4) + be32(count) + be32(2) + be32(3);
    for (const auto i : p.sites[s]) {
      expected += images.substr(16 + 6 * i, 6);
    }
    CHECK(text == expected);

    DataOptions shard_options;
    shard_options.path = written[0]; // the labels file is found beside it
    check_same_samples(load_dataset(shard_options), all, p.sites[s]);
  }
  const auto test_files = writer.write(p.holdout, dir / "data", SubsetRole::test);
  REQUIRE(test_files.size() == 2);
  CHECK(test_files[0].filename() == "test-images-idx3-ubyte.gz");
  CHECK(test_files[1].filename() == "test-labels-idx1-ubyte.gz");
  DataOptions test_options;
  test_options.path = test_files[0];
  check_same_samples(load_dataset(test_options), all, p.holdout);
  // The same subset gives the same bytes.
  writer.write(p.holdout, dir / "again", SubsetRole::test);
  CHECK(read_file(dir / "again" / "test-images-idx3-ubyte.gz") == read_file(test_files[0]));
}

TEST_CASE("core::partition splits the bundled digits table dirichlet:0.5 over 4 sites with a 0.2 holdout")
{
  // The source tree's data/digits.csv.gz: sklearn's digits, 1797 rows of 64 features and a
  // label in the last column, no header.
  const auto source = fs::path(__FILE__).parent_path().parent_path().parent_path() / "data" / "digits.csv.gz";
  REQUIRE(fs::exists(source));
  const auto options = csv_options(source, false);
  const auto all = load_dataset(options);
  REQUIRE(all.size() == 1797);

  const auto p = make_partition(all.labels, 4, parse_split("dirichlet:0.5"), 0.2, 2024);
  REQUIRE(p.sites.size() == 4);
  CHECK(p.holdout.size() == 359); // round(0.2 × 1797)
  check_cover(p.sites, p.holdout, all.size());
  CHECK(summarize(all.labels, p.holdout).class_counts.size() == 10);

  TempDir dir;
  const SubsetWriter writer(all, options);
  std::size_t total = 0;
  std::map<std::int64_t, std::size_t> classes;
  for (std::size_t s = 0; s < p.sites.size(); ++s) {
    const auto summary = summarize(all.labels, p.sites[s]);
    MESSAGE("site-" << s + 1 << ": " << format_summary(summary));
    const auto written = writer.write(p.sites[s], dir / fmt::format("site-{}", s + 1), SubsetRole::train);
    const auto shard = load_dataset(csv_options(written[0], false));
    CHECK(shard.size() == summary.samples);
    check_same_samples(shard, all, p.sites[s]);
    total += shard.size();
    for (const auto& [label, count] : summary.class_counts) {
      classes[label] += count;
    }
  }
  const auto test = load_dataset(csv_options(writer.write(p.holdout, dir / "data", SubsetRole::test)[0], false));
  CHECK(test.size() == 359);
  CHECK(total == 1797 - 359);
  CHECK(total + test.size() == 1797);
  for (const auto& [label, count] : summarize(all.labels, p.holdout).class_counts) {
    classes[label] += count;
  }
  std::map<std::int64_t, std::size_t> expected;
  for (const auto l : all.labels) {
    ++expected[l];
  }
  CHECK(classes == expected);
}

TEST_SUITE_END();
