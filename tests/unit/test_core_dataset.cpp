// SPDX-License-Identifier: Apache-2.0
#include "core/format/data_contract.hpp"
#include "core/format/dataset.hpp"
#include "core/util/error.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <limits>

using namespace fedl::core;
using fedl::test::TempDir;
using fedl::test::write_file;

namespace {

DataOptions
at(const std::filesystem::path& path)
{
  DataOptions o;
  o.path = path;
  return o;
}

std::string
error_of(const DataOptions& opt)
{
  try {
    (void)load_dataset(opt);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string
be32(std::uint32_t v)
{
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}

std::string
npy(const std::string& descr, const std::string& shape, const std::string& data)
{
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  while ((10 + header.size() + 1) % 64 != 0) {
    header += ' ';
  }
  header += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  return out + header + data;
}

template<typename T>
std::string
raw(std::initializer_list<T> values)
{
  std::string s;
  for (const T v : values) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  return s;
}

} // namespace

TEST_SUITE_BEGIN("core");

TEST_CASE("core::load_dataset reads CSV with a header, label by name, index or default last")
{
  TempDir dir;
  write_file(dir / "d.csv", "a,b,label\n1,2,0\n3.5,-4e-1,2\n\n5,6,1\r\n");
  auto ds = load_dataset(at(dir / "d.csv"));
  CHECK(ds.size() == 3);
  CHECK(ds.sample_shape == std::vector<std::int64_t>{2});
  CHECK(ds.features == std::vector<float>{1, 2, 3.5F, -0.4F, 5, 6});
  CHECK(ds.labels == std::vector<std::int64_t>{0, 2, 1});
  CHECK(ds.num_classes() == 3);
  CHECK(ds.where(2) == (dir / "d.csv").string() + ": line 5");

  DataOptions by_name = at(dir / "d.csv");
  by_name.label_column = "b";
  CHECK(error_of(by_name).find("line 3, column 2: label -4e-1 is not a class index") != std::string::npos);
  write_file(dir / "e.csv", "a,b,label\n1,2,0\n3,4,2\n");
  DataOptions first = at(dir / "e.csv");
  first.label_column = "a";
  ds = load_dataset(first);
  CHECK(ds.labels == std::vector<std::int64_t>{1, 3});
  CHECK(ds.features == std::vector<float>{2, 0, 4, 2});
}

TEST_CASE("core::load_dataset: --no-header, index column, limit")
{
  TempDir dir;
  write_file(dir / "d.csv", "0,1,2\n1,3,4\n2,5,6\n");
  DataOptions opt = at(dir / "d.csv");
  opt.header = false;
  opt.label_column = "0";
  opt.limit = 2;
  const auto ds = load_dataset(opt);
  CHECK(ds.labels == std::vector<std::int64_t>{0, 1});
  CHECK(ds.features == std::vector<float>{1, 2, 3, 4});
}

TEST_CASE("core::load_dataset: a first row of numbers only is a header only when the options say so")
{
  TempDir dir;
  write_file(dir / "d.csv", "5.1,3.5,0\n4.9,3.0,1\n");
  const auto message = error_of(at(dir / "d.csv"));
  CHECK(message.find("line 1 is all numbers, so it may be data rather than a header: give --no-header") !=
        std::string::npos);
  CHECK_THROWS_AS(load_dataset(at(dir / "d.csv")), UsageError);
  DataOptions yes = at(dir / "d.csv");
  yes.header = true;
  const auto ds = load_dataset(yes);
  CHECK(ds.size() == 1);
  CHECK(ds.columns == std::vector<std::string>{"5.1", "3.5", "0"});
  DataOptions no = at(dir / "d.csv");
  no.header = false;
  CHECK(load_dataset(no).size() == 2);
  CHECK(load_dataset(no).columns.empty());
  // One name among the numbers makes it a header.
  write_file(dir / "e.csv", "1,2,label\n4.9,3.0,1\n");
  CHECK(load_dataset(at(dir / "e.csv")).columns == std::vector<std::string>{"1", "2", "label"});
}

namespace {

std::string
contract_error(const Dataset& ds, const std::optional<DataContract>& c, std::vector<std::int64_t> shape,
               std::int64_t classes)
{
  try {
    check_data_contract(ds, c, shape, classes);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(no error)";
}

} // namespace

TEST_CASE("core::DataContract: recorded from a data set, through JSON, and what it refuses")
{
  TempDir dir;
  write_file(dir / "d.csv", "a,b,c,label\n1,2,3,0\n4,5,6,2\n");
  DataOptions opt = at(dir / "d.csv");
  opt.label_column = "label";
  const auto ds = load_dataset(opt);
  const auto c = DataContract::of(ds, opt);
  CHECK(c.format == DataFormat::csv);
  CHECK(c.header);
  CHECK(c.label_column == "label");
  CHECK(c.columns == std::vector<std::string>{"a", "b", "c", "label"});
  CHECK(DataContract::from_json(c.to_json(), "x") == c);
  CHECK(contract_error(ds, c, {3}, 3) == "(no error)");
  CHECK(contract_error(ds, c, {1, 3}, 3) == "(no error)"); // the model reshapes the 3 values
  CHECK(contract_error(ds, std::nullopt, {3}, 3) == "(no error)");

  const auto file = (dir / "d.csv").string();
  CHECK(contract_error(ds, c, {4}, 3) ==
        file + ": samples of shape 3 where the federation's model takes 4 (the number of feature columns: is the "
               "label column right?)");
  CHECK(contract_error(ds, std::nullopt, {3}, 2) ==
        file + ": line 3: label 2, where the federation's model has 2 classes (0 to 1)");
  auto moved = c;
  std::swap(moved.columns[0], moved.columns[1]);
  CHECK(contract_error(ds, moved, {3}, 3)
          .find("the columns are in another order: column 1 is 'a' where the "
                "federation's data has 'b'") != std::string::npos);
  auto renamed = c;
  renamed.columns[2] = "z";
  CHECK(contract_error(ds, renamed, {3}, 3).find("no column 'z', which the federation's data has") !=
        std::string::npos);
  auto fewer = c;
  fewer.columns.erase(fewer.columns.begin() + 2);
  CHECK(contract_error(ds, fewer, {3}, 3).find("column 'c' is not one of the federation's") != std::string::npos);
  auto idx = c;
  idx.format = DataFormat::idx;
  CHECK(contract_error(ds, idx, {3}, 3).find("csv data, where the federation's is idx") != std::string::npos);

  // From JSON: strict.
  CHECK(DataContract::from_json({{"format", "idx"}}, "x").format == DataFormat::idx);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "parquet"}}, "x"), UsageError);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "csv"}, {"headers", true}}, "x"), UsageError);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "csv"}, {"header", "yes"}}, "x"), UsageError);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "csv"}, {"label_column", 3}}, "x"), UsageError);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "csv"}, {"columns", {"a", 1}}}, "x"), UsageError);
  CHECK_THROWS_AS(DataContract::from_json({{"format", "csv"}, {"header", false}, {"columns", {"a", "b"}}}, "x"),
                  UsageError);
  CHECK_THROWS_AS(DataContract::from_json(nlohmann::json::array(), "x"), UsageError);
}

TEST_CASE("core::load_dataset names the line and column of bad cells")
{
  TempDir dir;
  write_file(dir / "nan.csv", "x,y\n1,0\nnan,1\n");
  CHECK(error_of(at(dir / "nan.csv")).find("line 3, column 1: nan is not a finite number") != std::string::npos);
  write_file(dir / "word.csv", "x,y\n1,0\n2,one\n");
  CHECK(error_of(at(dir / "word.csv")).find("line 3, column 2: 'one' is not a number") != std::string::npos);
  write_file(dir / "ragged.csv", "x,y\n1,0\n2\n");
  CHECK(error_of(at(dir / "ragged.csv")).find("line 3: 1 columns where the first row has 2") != std::string::npos);
  write_file(dir / "neg.csv", "x,y\n1,-1\n");
  CHECK(error_of(at(dir / "neg.csv")).find("label -1 is not a class index") != std::string::npos);
  DataOptions unknown = at(dir / "nan.csv");
  unknown.label_column = "nope";
  CHECK_THROWS_AS(load_dataset(unknown), UsageError);
  CHECK(error_of(at(dir / "missing.csv")).find("missing.csv") != std::string::npos);
  CHECK_THROWS_AS(load_dataset(at(dir / "data.parquet")), UsageError);
}

TEST_CASE("core::load_dataset reads IDX images scaled to [0,1] with labels found beside them")
{
  TempDir dir;
  std::string images = std::string("\0\0\x08\x03", 4) + be32(2) + be32(2) + be32(2);
  images += std::string("\x00\xff\x33\x66\x01\x02\x03\x04", 8);
  const std::string labels = std::string("\0\0\x08\x01", 4) + be32(2) + std::string("\x07\x03", 2);
  write_file(dir / "train-images-idx3-ubyte", images);
  write_file(dir / "train-labels-idx1-ubyte", labels);
  const auto ds = load_dataset(at(dir / "train-images-idx3-ubyte"));
  CHECK(ds.sample_shape == std::vector<std::int64_t>{1, 2, 2});
  CHECK(ds.labels == std::vector<std::int64_t>{7, 3});
  CHECK(ds.features[0] == 0.0F);
  CHECK(ds.features[1] == 1.0F);
  CHECK(ds.features[2] == doctest::Approx(0x33 / 255.0));

  write_file(dir / "cut-images-idx3-ubyte", images.substr(0, images.size() - 1));
  write_file(dir / "cut-labels-idx1-ubyte", labels);
  CHECK_THROWS_AS(load_dataset(at(dir / "cut-images-idx3-ubyte")), VerifyError);
  write_file(dir / "lone-images-idx3-ubyte", images);
  CHECK(error_of(at(dir / "lone-images-idx3-ubyte")).find("lone-labels-idx1-ubyte") != std::string::npos);
}

TEST_CASE("core::load_dataset reads NPY features and labels")
{
  TempDir dir;
  write_file(dir / "features.npy", npy("<f4", "3, 2", raw<float>({1, 2, 3, 4, 5, 6})));
  write_file(dir / "labels.npy", npy("<i8", "3,", raw<std::int64_t>({0, 1, 1})));
  const auto ds = load_dataset(at(dir / "features.npy"));
  CHECK(ds.sample_shape == std::vector<std::int64_t>{2});
  CHECK(ds.features == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(ds.labels == std::vector<std::int64_t>{0, 1, 1});

  write_file(dir / "x.npy", npy("<f8", "2, 1", raw<double>({1, 2}).substr(0, 12)));
  write_file(dir / "y.npy", npy("<i8", "2,", raw<std::int64_t>({0, 1})));
  CHECK_THROWS_AS(load_dataset(at(dir / "x.npy")), VerifyError);
  write_file(dir / "nan_features.npy", npy("<f4", "1, 1", raw<float>({std::nanf("")})));
  write_file(dir / "nan_labels.npy", npy("<i8", "1,", raw<std::int64_t>({0})));
  CHECK(error_of(at(dir / "nan_features.npy")).find("not a finite number") != std::string::npos);
}

TEST_CASE("core::load_dataset refuses values a float or a class index cannot hold, and empty samples")
{
  TempDir dir;
  // Finite doubles past FLT_MAX would convert to inf (the conversion is undefined in C++).
  write_file(dir / "big.csv", "x,y\n1,0\n1e39,1\n");
  CHECK(error_of(at(dir / "big.csv"))
          .find("line 3, column 1: 1e39 is not a finite number in the range of a 32-bit float") != std::string::npos);
  write_file(dir / "big_features.npy", npy("<f8", "1, 1", raw<double>({-1e300})));
  write_file(dir / "big_labels.npy", npy("<i8", "1,", raw<std::int64_t>({0})));
  CHECK(error_of(at(dir / "big_features.npy")).find("not a finite number in the range of a 32-bit float") !=
        std::string::npos);
  // Labels become int64: inf and 1e300 are no class index (converting them would be undefined).
  write_file(dir / "f_features.npy", npy("<f4", "2, 1", raw<float>({1, 2})));
  for (const double bad : {std::numeric_limits<double>::infinity(), 1e300, 0.5}) {
    write_file(dir / "f_labels.npy", npy("<f8", "2,", raw<double>({0, bad})));
    CHECK(error_of(at(dir / "f_features.npy")).find("sample 1: label") != std::string::npos);
  }
  // A zero dimension after the first: samples without features.
  write_file(dir / "empty_features.npy", npy("<f4", "2, 0", ""));
  write_file(dir / "empty_labels.npy", npy("<i8", "2,", raw<std::int64_t>({0, 1})));
  CHECK(error_of(at(dir / "empty_features.npy")).find("samples of shape (0) have no features") != std::string::npos);
  const std::string images = std::string("\0\0\x08\x03", 4) + be32(2) + be32(3) + be32(0);
  const std::string labels = std::string("\0\0\x08\x01", 4) + be32(2) + std::string("\x01\x00", 2);
  write_file(dir / "empty-images-idx3-ubyte", images);
  write_file(dir / "empty-labels-idx1-ubyte", labels);
  CHECK(error_of(at(dir / "empty-images-idx3-ubyte")).find("samples of shape (1,3,0) have no features") !=
        std::string::npos);
}

TEST_CASE("core::parse_shape")
{
  CHECK(parse_shape("1,28,28", "x") == std::vector<std::int64_t>{1, 28, 28});
  CHECK(shape_to_string({1, 28, 28}) == "1,28,28");
  CHECK_THROWS_AS(parse_shape("0", "x"), UsageError);
  CHECK_THROWS_AS(parse_shape("a,b", "x"), UsageError);
  CHECK_THROWS_AS(parse_shape("", "x"), UsageError);
}

TEST_SUITE_END();
