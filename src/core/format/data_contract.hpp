// SPDX-License-Identifier: Apache-2.0
// The data contract of a federation: how every party's data is laid out, recorded by fedl init
// from the data set it partitions (fedl.json "data", and each site's join.json contract, signed
// with it) so that the sites and the coordinator's evaluator read their files the same way and a
// site whose columns differ is refused at start rather than trained on misaligned features.
// The model's input shape and classes complete it (fedl.json "model").
#pragma once

#include "core/format/dataset.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

struct DataContract
{
  DataFormat format = DataFormat::csv;
  bool header = true;                      // CSV: the first row names the columns
  std::optional<std::string> label_column; // CSV: as fedl init was given it (a name or an index)
  std::vector<std::string> columns;        // CSV with a header: every column's name, in order

  bool operator==(const DataContract&) const = default;

  // The contract that `data`, loaded with `options`, sets.
  static DataContract of(const Dataset& data, const DataOptions& options);

  nlohmann::json to_json() const;
  // UsageError naming `what` and the field for anything malformed (unknown keys included).
  static DataContract from_json(const nlohmann::json& j, const std::string& what);
};

std::string_view data_format_name(DataFormat f) noexcept;

// Throws UsageError naming `data`'s file and the first difference from the contract (if there is
// one: older workspaces have none) and from the model's sample shape and classes: the file's
// format, a header row or its absence, a column renamed, moved, missing or added (by name and
// position), the number of values in a sample (the model reshapes them), a label past the classes.
void check_data_contract(const Dataset& data, const std::optional<DataContract>& contract,
                         const std::vector<std::int64_t>& shape, std::int64_t classes);

} // namespace fedl::core
