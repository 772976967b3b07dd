// SPDX-License-Identifier: Apache-2.0
#include "cmd/common.hpp"

#include "core/util/error.hpp"
#include "core/util/log.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>
#include <thread>

namespace fedl::cmd {

namespace {

std::chrono::steady_clock::time_point g_start = std::chrono::steady_clock::now();

std::map<const CLI::Option*, std::vector<std::string>>&
choice_registry()
{
  static std::map<const CLI::Option*, std::vector<std::string>> registry;
  return registry;
}

} // namespace

CLI::Option*
with_choices(CLI::Option* option, std::vector<std::string> choices)
{
  option->check(CLI::IsMember(choices));
  choice_registry()[option] = std::move(choices);
  return option;
}

const std::vector<std::string>&
choices_of(const CLI::Option* option)
{
  static const std::vector<std::string> none;
  const auto it = choice_registry().find(option);
  return it == choice_registry().end() ? none : it->second;
}

CLI::Option*
with_suggestions(CLI::Option* option, std::vector<std::string> values)
{
  choice_registry()[option] = std::move(values);
  return option;
}

std::vector<std::string>
arch_suggestions()
{
  return {"logreg", "mlp:64", "mlp:128", "mlp:128,64", "cnn"};
}

std::vector<std::string>
strategy_suggestions()
{
  return {"fedavg", "fedavgm",          "fedadam", "fedyogi",       "fedadagrad",
          "median", "trimmed-mean:0.1", "krum:1",  "multi-krum:1,2"};
}

GlobalOptions&
globals()
{
  static GlobalOptions options;
  return options;
}

void
add_global_options(CLI::App& app, GlobalOptions& o)
{
  app.add_flag("--json", o.json, "Print the result as one JSON document on stdout");
  app.add_flag("-q,--quiet", o.quiet, "Print only errors on stderr");
  app.add_flag("-v,--verbose", o.verbose, "Print debug messages on stderr");
  with_choices(app.add_option("--log-format", o.log_format, "Format of messages on stderr"), {"text", "json"});
  app.add_flag("-V,--version", o.version, "Print the version, the backends and their devices");
}

void
add_compute_options(CLI::App& app, ComputeOptions& o)
{
  with_suggestions(app.add_option("--device", o.device, "Compute device: auto, cpu, cuda, cuda:N or a backend name"),
                   {"auto", "cpu", "cuda", "cuda:0"})
    ->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads for compute (default: the number of cores)")
    ->check(CLI::Range(1U, 1024U));
}

std::pair<const backends::Backend*, std::string>
open_backend(const ComputeOptions& options)
{
  auto resolved = backends::resolve_device(options.device);
  const auto threads = options.threads > 0 ? options.threads : std::max(1U, std::thread::hardware_concurrency());
  resolved.first->api->set_threads(static_cast<std::int32_t>(threads));
  return resolved;
}

core::SandboxPolicy
SandboxFlags::policy(std::string who) const
{
  core::SandboxPolicy p;
  p.level = core::parse_sandbox_level(level, "--sandbox");
  p.name = std::move(who);
  if (memory) {
    p.limits.memory_bytes = core::parse_memory_size(*memory, "--memory-limit");
  }
  if (cpus) {
    if (!(*cpus >= 0.01 && *cpus <= 4096)) {
      throw core::UsageError("--cpu-limit {}: give the cores it may use, from 0.01 to 4096", *cpus);
    }
    p.limits.cpus = cpus;
  }
  // Threads count: LibTorch's and OpenMP's pools are a few per core.
  p.limits.pids = pids.value_or(64 + 8 * std::uint64_t{std::max(1U, std::thread::hardware_concurrency())});
  return p;
}

std::vector<std::string>
SandboxFlags::to_args() const
{
  std::vector<std::string> args{"--sandbox", level};
  if (memory) {
    args.insert(args.end(), {"--memory-limit", *memory});
  }
  if (cpus) {
    args.insert(args.end(), {"--cpu-limit", fmt::format("{}", *cpus)});
  }
  if (pids) {
    args.insert(args.end(), {"--pids-limit", std::to_string(*pids)});
  }
  return args;
}

void
add_sandbox_options(CLI::App& app, SandboxFlags& f)
{
  with_choices(app.add_option("--sandbox", f.level,
                              "Confine the trainer: strict (refuse to run without every layer), auto (every layer "
                              "the host offers) or off"),
               {"strict", "auto", "off"})
    ->capture_default_str();
  app.add_option("--memory-limit", f.memory, "The trainer's memory limit (cgroup): 512M, 2G, ... (default: none)")
    ->type_name("SIZE");
  app.add_option("--cpu-limit", f.cpus, "The CPU time the trainer may use, in cores (cgroup; default: all)")
    ->type_name("CORES");
  app.add_option("--pids-limit", f.pids, "Most processes and threads in the trainer (default: 64 + 8 per core)")
    ->check(CLI::Range(std::uint64_t{8}, std::uint64_t{1} << 22))
    ->type_name("N");
}

core::SandboxReport
enter_trainer_sandbox(core::SandboxPolicy policy)
{
  if (policy.level == core::SandboxLevel::off) {
    FEDL_LOG_WARN("sandbox off: {} runs with all of this user's access (every file, the network, other programs)",
                  policy.name);
    return core::enter_sandbox(policy);
  }
  if (backends::backends_loaded()) {
    const auto why = "the compute backends were loaded before the sandbox (a fork server started with --sandbox off)";
    if (policy.level == core::SandboxLevel::strict) {
      throw core::Error("--sandbox strict: {}; stop that fork server or run without --fork-server", why);
    }
    FEDL_LOG_WARN("sandbox: {}", why);
  }
  for (const auto& dir : backends::search_path()) {
    policy.read.push_back(dir);
  }
  const auto report = core::enter_sandbox(policy);
  if (report.complete()) {
    FEDL_LOG_INFO("{}", report.summary());
  } else {
    FEDL_LOG_WARN("{}", report.summary());
  }
  return report;
}

std::optional<core::DpSgdConfig>
DpSgdFlags::resolve() const
{
  if (!noise_multiplier && !max_grad_norm) {
    if (delta) {
      throw core::UsageError(
        "--dp-delta is the delta of DP-SGD: give --dp-noise-multiplier and --dp-max-grad-norm too");
    }
    return std::nullopt;
  }
  if (!noise_multiplier || !max_grad_norm) {
    throw core::UsageError("DP-SGD needs both --dp-noise-multiplier S and --dp-max-grad-norm C");
  }
  const core::DpSgdConfig dp{*noise_multiplier, *max_grad_norm, delta.value_or(1e-5)};
  core::check_dp(dp.noise_multiplier, dp.max_grad_norm, dp.delta,
                 {"--dp-noise-multiplier", "--dp-max-grad-norm", "--dp-delta"});
  return dp;
}

void
add_dp_sgd_options(CLI::App& app, DpSgdFlags& f)
{
  app
    .add_option("--dp-noise-multiplier", f.noise_multiplier,
                "DP-SGD: noise standard deviation over the clip norm (with --dp-max-grad-norm)")
    ->type_name("S");
  app.add_option("--dp-max-grad-norm", f.max_grad_norm, "DP-SGD: clip each example's gradient to this L2 norm")
    ->type_name("C");
  app.add_option("--dp-delta", f.delta, "DP-SGD: the delta that epsilon is reported at (default 1e-5)")->type_name("D");
}

void
add_accountant_option(CLI::App& app, std::optional<std::string>& value, const std::string& help)
{
  with_choices(
    app.add_option("--accountant", value, help + ": pld (privacy loss distributions, the tightest; default) or rdp"),
    {"pld", "rdp"});
}

std::optional<core::Accountant>
resolve_accountant(const std::optional<std::string>& value)
{
  if (!value) {
    return std::nullopt;
  }
  return core::accountant_from_flag(*value, "--accountant");
}

void
add_metrics_set_option(CLI::App& app, std::string& value, const std::string& what)
{
  with_choices(app
                 .add_option("--metrics-set", value,
                             what + ": basic (accuracy, loss) or classification (and per-class precision, recall, "
                                    "F1, macro F1; for two classes sensitivity, specificity, ROC AUC)")
                 ->capture_default_str(),
               {"basic", "classification"});
}

std::optional<core::SecureAggregationConfig>
SecureAggregationFlags::resolve(const std::optional<core::SecureAggregationConfig>& configured) const
{
  if (!on && !configured) {
    if (distributed_dp || threshold || neighbours || range) {
      throw core::UsageError("--secagg-threshold, --secagg-neighbours, --secagg-range and --distributed-dp set secure "
                             "aggregation up: turn it on with --secure-aggregation");
    }
    return std::nullopt;
  }
  auto s = configured.value_or(core::SecureAggregationConfig{});
  s.distributed_dp = s.distributed_dp || distributed_dp;
  s.threshold = threshold.value_or(s.threshold);
  s.neighbours = neighbours.value_or(s.neighbours);
  s.range = range.value_or(s.range);
  core::check_secure_aggregation(s, {"--secagg-threshold", "--secagg-neighbours", "--secagg-range"});
  return s;
}

void
add_secure_aggregation_options(CLI::App& app, SecureAggregationFlags& f)
{
  app.add_flag("--secure-aggregation", f.on,
               "Secure aggregation (SecAgg+): the coordinator sees only the sum of each round's updates");
  app
    .add_option("--secagg-threshold", f.threshold,
                "Shares that rebuild a site's masks: a count, or a fraction of the sites asked (default: a majority "
                "of its neighbours)")
    ->type_name("T");
  app
    .add_option("--secagg-neighbours", f.neighbours,
                "Neighbours per site (default: all up to 16 sites, then 2*ceil(log2 n)+2)")
    ->check(CLI::Range(2U, core::SecureAggregationConfig::max_neighbours))
    ->type_name("K");
  app.add_option("--secagg-range", f.range, "Each value of an update is clipped to [-R, R] (default 1)")
    ->type_name("R");
  app.add_flag("--distributed-dp", f.distributed_dp,
               "With secure aggregation and client-level DP: each site adds its share of the noise before masking");
}

void
add_data_options(CLI::App& app, DataFlags& f)
{
  app.add_option("--data", f.data, "Data file: .csv[.gz], IDX images (-ubyte[.gz]) or .npy features")
    ->required()
    ->type_name("PATH");
  add_data_format_options(app, f);
}

void
add_data_format_options(CLI::App& app, DataFlags& f)
{
  app.add_option("--labels", f.labels, "Labels file for IDX or NPY data (default: found beside the data)")
    ->type_name("PATH");
  app
    .add_option("--label-column", f.label_column,
                "CSV label column, by header name or 0-based index "
                "(default: the last)")
    ->type_name("NAME|INDEX");
  auto* header = app.add_flag_callback(
    "--header", [&f] { f.header = true; }, "The CSV file's first row is a header");
  auto* no_header = app.add_flag_callback(
    "--no-header", [&f] { f.header = false; }, "The CSV file has no header row");
  header->excludes(no_header);
  app.add_option("--limit-samples", f.limit, "Use only the first N samples")
    ->check(CLI::PositiveNumber)
    ->type_name("N");
}

core::DataOptions
DataFlags::to_options() const
{
  return {data, labels, label_column, header, limit};
}

void
print_result(const nlohmann::json& result, const std::string& text)
{
  if (globals().json) {
    // Every document says which version of fedl's JSON output it is (fedl(1) OUTPUT).
    auto versioned = result;
    if (versioned.is_object()) {
      versioned["schema"] = json_schema_version;
    }
    fmt::print("{}\n", versioned.dump(2));
  } else if (!text.empty()) {
    fmt::print("{}", text);
  }
  std::fflush(stdout);
}

void
mark_process_start()
{
  g_start = std::chrono::steady_clock::now();
}

double
uptime_seconds()
{
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
}

std::vector<std::string>
DataFlags::to_args() const
{
  std::vector<std::string> args{"--data", data.string()};
  if (labels) {
    args.insert(args.end(), {"--labels", labels->string()});
  }
  if (label_column) {
    args.insert(args.end(), {"--label-column", *label_column});
  }
  if (header) {
    args.emplace_back(*header ? "--header" : "--no-header");
  }
  if (limit) {
    args.insert(args.end(), {"--limit-samples", std::to_string(*limit)});
  }
  return args;
}

DataFlags
DataFlags::with_contract(const std::optional<core::DataContract>& contract, const std::string& where) const
{
  if (!contract || contract->format != core::DataFormat::csv) {
    return *this;
  }
  DataFlags out = *this;
  if (header && *header != contract->header) {
    throw core::UsageError("{}: the federation's data {} header row ({}), so {} contradicts it: drop the option{}",
                           data.string(), contract->header ? "has a" : "has no", where,
                           *header ? "--header" : "--no-header",
                           contract->header ? "" : " (and remove the header row)");
  }
  out.header = contract->header;
  if (label_column && label_column != contract->label_column) {
    throw core::UsageError("--label-column {}: the federation's data has its label in {} ({}): drop the option",
                           *label_column,
                           contract->label_column ? "column " + *contract->label_column : "the last column", where);
  }
  out.label_column = contract->label_column;
  return out;
}

void
check_data_file(const DataFlags& flags, const std::optional<core::DataContract>& contract,
                const std::vector<std::int64_t>& shape, std::int64_t classes)
{
  core::check_data_contract(core::load_dataset(flags.to_options()), contract, shape, classes);
}

} // namespace fedl::cmd
