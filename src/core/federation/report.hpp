// SPDX-License-Identifier: Apache-2.0
// `fedl report WS`: one self-contained HTML page about a federation's history, for a person to
// look at and to archive beside the workspace. It draws what `fedl audit` verified: nothing from
// an unverified ledger (a ledger that fails the audit gets a page that says so and why, and no
// figures). No script, no network (a Content-Security-Policy of default-src 'none'), charts as
// inline SVG: accuracy and loss per round, epsilon per round (client-level and per site),
// participation (updates, rejected, dropped, late, of those asked) and round durations, then a
// table of every round. Each point and bar of a chart is one element with data-series and
// data-round, and a title that shows its value on hover.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace fedl::core {

struct ReportInput
{
  std::string workspace; // as the operator named it
  // The audit's --json result (core/federation/audit.hpp); null if the audit failed.
  nlohmann::json audit;
  std::string failure;   // why the audit failed, if it did
  std::string generated; // UTC time, ISO 8601
  std::string version;   // fedl's
};

// The page (UTF-8). Every text from the ledger or fedl.json is escaped.
std::string report_html(const ReportInput& in);

// The series a site's epsilon chart shows at most (those that spent the most).
inline constexpr std::size_t report_max_site_series = 12;

} // namespace fedl::core
