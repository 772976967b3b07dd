// SPDX-License-Identifier: Apache-2.0
// `fedl status WS`: the federation as its coordinator sees it now. `fedl serve` keeps
// WS/state/status.json up to date (whenever the round changes, else once a second; replaced
// whole, never half-written; coordinator_status.cpp): its state (waiting, running, aggregating,
// finishing, then finished, interrupted or failed), the round and attempt, the seconds left before
// the deadline, who was asked and who has reported, the enrolled sites with address and the
// seconds since each was last heard, the recent rounds' accuracy and epsilon. This file reads it
// back and says whether the coordinator that wrote it is still running.
#pragma once

#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace fedl::core {

// The status file's "schema": raised when a field is removed, renamed or changes meaning.
inline constexpr int status_schema = 1;
// A status older than this many seconds is stale: its coordinator no longer writes it.
inline constexpr double status_stale_after = 30;

// This machine's name (gethostname), for telling whether a status's pid can be checked here.
std::string host_name();

struct StatusReport
{
  // The file's document, with "running" (its coordinator is alive and writing) and
  // "age_seconds" (since it was written) added.
  nlohmann::json doc;
  std::string text; // the same for a person
  bool running = false;
};

// The status of `ws`, or nullopt if no coordinator has written one. Throws Error (exit 1) naming
// the file if it cannot be read or is not a status file of a schema this fedl knows.
std::optional<StatusReport> read_status(const Workspace& ws);

// The text of a status document as read_status completes it.
std::string status_text(const nlohmann::json& doc);

} // namespace fedl::core
