// SPDX-License-Identifier: Apache-2.0
#include "core/format/data_contract.hpp"

#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <functional>
#include <numeric>

namespace fedl::core {

namespace {

using json = nlohmann::json;

// A CSV may have thousands of columns: a message names at most this many.
constexpr std::size_t k_columns_named = 12;

std::string
column_list(const std::vector<std::string>& columns)
{
  std::vector<std::string> shown;
  for (std::size_t i = 0; i < columns.size() && i < k_columns_named; ++i) {
    shown.push_back(quote_text(columns[i]));
  }
  return fmt::format("{}{}", fmt::join(shown, ", "),
                     columns.size() > k_columns_named ? fmt::format(", ... ({} in all)", columns.size()) : "");
}

void
check_columns(const Dataset& data, const std::vector<std::string>& want)
{
  const auto& have = data.columns;
  const auto file = data.source.string();
  for (const auto& name : want) {
    if (std::find(have.begin(), have.end(), name) == have.end()) {
      throw UsageError("{}: no column {}, which the federation's data has (its columns: {})", file, quote_text(name),
                       column_list(want));
    }
  }
  for (const auto& name : have) {
    if (std::find(want.begin(), want.end(), name) == want.end()) {
      throw UsageError("{}: column {} is not one of the federation's (its columns: {})", file, quote_text(name),
                       column_list(want));
    }
  }
  if (have.size() != want.size()) {
    throw UsageError("{}: {} columns where the federation's data has {} (a column named twice?)", file, have.size(),
                     want.size());
  }
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (have[i] != want[i]) {
      throw UsageError("{}: the columns are in another order: column {} is {} where the federation's data has {} "
                       "(features in another order would be trained on as the wrong ones; its order: {})",
                       file, i + 1, quote_text(have[i]), quote_text(want[i]), column_list(want));
    }
  }
}

} // namespace

std::string_view
data_format_name(DataFormat f) noexcept
{
  switch (f) {
  case DataFormat::idx:
    return "idx";
  case DataFormat::npy:
    return "npy";
  case DataFormat::csv:
    break;
  }
  return "csv";
}

DataContract
DataContract::of(const Dataset& data, const DataOptions& options)
{
  DataContract c;
  c.format = data.format;
  if (c.format == DataFormat::csv) {
    c.header = options.header.value_or(true);
    c.label_column = options.label_column;
    c.columns = data.columns;
  }
  return c;
}

json
DataContract::to_json() const
{
  json j = {{"format", data_format_name(format)}};
  if (format == DataFormat::csv) {
    j["header"] = header;
    if (label_column) {
      j["label_column"] = *label_column;
    }
    if (!columns.empty()) {
      j["columns"] = columns;
    }
  }
  return j;
}

DataContract
DataContract::from_json(const json& j, const std::string& what)
{
  if (!j.is_object()) {
    throw UsageError("{}: data is not a JSON object", what);
  }
  static const std::vector<std::string> known{"format", "header", "label_column", "columns"};
  for (const auto& [k, v] : j.items()) {
    if (std::find(known.begin(), known.end(), k) == known.end()) {
      throw UsageError("{}: unknown key data.{} (this fedl knows {})", what, quote_text(k), fmt::join(known, ", "));
    }
  }
  DataContract c;
  const auto format = j.find("format");
  if (format == j.end() || !format->is_string()) {
    throw UsageError("{}: data.format is missing or not a string", what);
  }
  const auto name = format->get<std::string>();
  const auto formats = {DataFormat::csv, DataFormat::idx, DataFormat::npy};
  const auto f = std::find_if(formats.begin(), formats.end(), [&](auto x) { return data_format_name(x) == name; });
  if (f == formats.end()) {
    throw UsageError("{}: data.format is {}, not csv, idx or npy", what, quote_text(name));
  }
  c.format = *f;
  if (const auto it = j.find("header"); it != j.end()) {
    if (!it->is_boolean()) {
      throw UsageError("{}: data.header is not true or false", what);
    }
    c.header = it->get<bool>();
  }
  if (const auto it = j.find("label_column"); it != j.end()) {
    if (!it->is_string() || it->get<std::string>().empty()) {
      throw UsageError("{}: data.label_column is not a column name or index (a string)", what);
    }
    c.label_column = it->get<std::string>();
  }
  if (const auto it = j.find("columns"); it != j.end()) {
    if (!it->is_array() || it->size() < 2) {
      throw UsageError("{}: data.columns is not a list of at least two column names", what);
    }
    for (const auto& col : *it) {
      if (!col.is_string()) {
        throw UsageError("{}: data.columns has an entry that is not a string: {}", what, quote_text(col.dump()));
      }
      c.columns.push_back(col.get<std::string>());
    }
  }
  if (!c.columns.empty() && (c.format != DataFormat::csv || !c.header)) {
    throw UsageError("{}: data.columns names the columns of a CSV file with a header row, not of this data", what);
  }
  return c;
}

void
check_data_contract(const Dataset& data, const std::optional<DataContract>& contract,
                    const std::vector<std::int64_t>& shape, std::int64_t classes)
{
  const auto file = data.source.string();
  if (contract && data.format != contract->format) {
    throw UsageError("{}: {} data, where the federation's is {}", file, data_format_name(data.format),
                     data_format_name(contract->format));
  }
  if (contract && contract->format == DataFormat::csv && !contract->columns.empty()) {
    check_columns(data, contract->columns);
  }
  if (static_cast<std::int64_t>(data.sample_numel()) !=
      std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>())) {
    throw UsageError("{}: samples of shape {} where the federation's model takes {}{}", file, data.shape_string(),
                     shape_to_string(shape),
                     data.format == DataFormat::csv ? " (the number of feature columns: is the label column right?)"
                                                    : "");
  }
  for (std::size_t i = 0; i < data.size(); ++i) {
    if (data.labels[i] >= classes) {
      throw UsageError("{}: label {}, where the federation's model has {} classes (0 to {})", data.where(i),
                       data.labels[i], classes, classes - 1);
    }
  }
}

} // namespace fedl::core
