// SPDX-License-Identifier: Apache-2.0
// Option groups shared by several subcommands (added once here, so a flag means the same
// everywhere) and the output helpers for stdout.
#pragma once

#include "backends/loader.hpp"
#include "core/config/config.hpp"
#include "core/format/dataset.hpp"
#include "core/sandbox/sandbox.hpp"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace CLI {
class App;
class Option;
} // namespace CLI

namespace fedl::cmd {

struct GlobalOptions
{
  bool json = false;
  bool quiet = false;
  bool verbose = false;
  std::string log_format = "text";
  bool version = false;
};

// Adds CLI::IsMember(`choices`) to `option` and records the choices for completions.
CLI::Option* with_choices(CLI::Option* option, std::vector<std::string> choices);
// The choices recorded for `option` (empty if none): with_choices's, else with_suggestions's.
const std::vector<std::string>& choices_of(const CLI::Option* option);
// Records values that completions offer for `option` without restricting it to them (an
// architecture, a split, a strategy, a device: forms with parameters the shell cannot list).
CLI::Option* with_suggestions(CLI::Option* option, std::vector<std::string> values);
// The strategies completions offer: fedavg ... multi-krum, those with parameters in an example form.
std::vector<std::string> strategy_suggestions();
// The zoo architectures completions offer (--arch), in an example form.
std::vector<std::string> arch_suggestions();

// The process's global options, filled in by main's parse.
GlobalOptions& globals();
void add_global_options(CLI::App& app, GlobalOptions& options);

struct ComputeOptions
{
  std::string device = "auto";
  std::uint32_t threads = 0; // 0: the number of cores
};
void add_compute_options(CLI::App& app, ComputeOptions& options);
// Loads the backend for `--device` and sets its thread count (--threads, default the number of
// cores). Throws as backends::resolve_device does.
std::pair<const backends::Backend*, std::string> open_backend(const ComputeOptions& options);

// --sandbox, --memory-limit, --cpu-limit, --pids-limit: the trainer sandbox (core/sandbox) of
// fedl join's trainer and of fedl train.
struct SandboxFlags
{
  std::string level = "auto";
  std::optional<std::string> memory;
  std::optional<double> cpus;
  std::optional<std::uint64_t> pids;

  // The policy these flags ask for, without paths (the caller adds them); the pids limit is
  // 64 + 8 per core unless given. `who` names the process in messages ("the trainer").
  core::SandboxPolicy policy(std::string who) const;
  // The same flags, for a child's command line.
  std::vector<std::string> to_args() const;
};
void add_sandbox_options(CLI::App& app, SandboxFlags& flags);
// Enters the sandbox `policy` asks for, the backends' folders readable, and logs what it runs
// under (loudly when off). Must come before any backend, model or module is opened: under
// strict, a backend already loaded (a fork server started without the sandbox) is refused.
core::SandboxReport enter_trainer_sandbox(core::SandboxPolicy policy);

// --dp-noise-multiplier, --dp-max-grad-norm, --dp-delta: sample-level DP-SGD (fedl train; fedl
// init, for the sites' training in every task).
struct DpSgdFlags
{
  std::optional<double> noise_multiplier;
  std::optional<double> max_grad_norm;
  std::optional<double> delta;

  // None if no flag is given; UsageError (naming the flag) for half a setting or a bad value.
  std::optional<core::DpSgdConfig> resolve() const;
};
void add_dp_sgd_options(CLI::App& app, DpSgdFlags& flags);

// --accountant pld|rdp: how epsilon is computed (core/math/accountant.hpp); `help` says for what.
void add_accountant_option(CLI::App& app, std::optional<std::string>& value, const std::string& help);
// The option's accountant, none if not given; UsageError naming --accountant for another value.
std::optional<core::Accountant> resolve_accountant(const std::optional<std::string>& value);
// --metrics-set basic|classification (core/math/metrics.hpp), into `value`.
void add_metrics_set_option(CLI::App& app, std::string& value, const std::string& what);

// --secure-aggregation, --secagg-threshold, --secagg-neighbours, --secagg-range, --distributed-dp
// (fedl init records them in fedl.json; fedl serve turns it on or sets values over fedl.json's).
struct SecureAggregationFlags
{
  bool on = false;
  bool distributed_dp = false;
  std::optional<double> threshold;
  std::optional<std::uint32_t> neighbours;
  std::optional<double> range;

  // `configured` (fedl.json's; none in a new workspace) with the flags over it; none if neither
  // asks for secure aggregation. UsageError (naming the flag) for a value out of range, or a
  // setting given with nothing to set up.
  std::optional<core::SecureAggregationConfig> resolve(
    const std::optional<core::SecureAggregationConfig>& configured) const;
};
void add_secure_aggregation_options(CLI::App& app, SecureAggregationFlags& flags);

struct DataFlags
{
  std::filesystem::path data;
  std::optional<std::filesystem::path> labels;
  std::optional<std::string> label_column;
  std::optional<bool> header; // --header / --no-header; none: expected, but not all numbers
  std::optional<std::size_t> limit;

  core::DataOptions to_options() const;
  // The same flags as command-line arguments, for a child process (fedl __worker).
  std::vector<std::string> to_args() const;
  // These flags completed by the federation's data contract (from `where`, e.g. join.json): the
  // header and the label column are the contract's unless given, and a flag that contradicts the
  // contract is a UsageError that says so.
  DataFlags with_contract(const std::optional<core::DataContract>& contract, const std::string& where) const;
};
// --data (required) and the format options below.
void add_data_options(CLI::App& app, DataFlags& flags);
// --labels, --label-column, --header, --no-header, --limit-samples.
void add_data_format_options(CLI::App& app, DataFlags& flags);
// Loads the data `flags` name and checks it against the contract, the model's sample shape and its
// classes (core::check_data_contract): UsageError (exit 2) naming what differs.
void check_data_file(const DataFlags& flags, const std::optional<core::DataContract>& contract,
                     const std::vector<std::int64_t>& shape, std::int64_t classes);

// The version of fedl's --json documents, their "schema" field: raised when a field is removed,
// renamed or changes meaning (new fields do not raise it).
inline constexpr int json_schema_version = 1;
// Prints `result` as one JSON document with --json (with "schema"), else `text` (if not empty),
// on stdout.
void print_result(const nlohmann::json& result, const std::string& text);

// Seconds since the process started (main's first line).
double uptime_seconds();
void mark_process_start();

} // namespace fedl::cmd
