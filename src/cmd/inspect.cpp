// SPDX-License-Identifier: Apache-2.0
// fedl inspect: what a model file or a TorchScript module holds, and whether fedl would run it
// (the backend's walk against the operator allow-list; man fedl-inspect).
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "cmd/model_io.hpp"
#include "core/format/safetensors.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <array>
#include <fstream>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct InspectOptions
{
  fs::path model;
};

bool
is_zip(const fs::path& path)
{
  std::ifstream in(path, std::ios::binary);
  std::array<char, 4> magic{};
  return in.read(magic.data(), magic.size()) && std::string_view(magic.data(), 4) == "PK\x03\x04";
}

std::string
tensors_text(const char* what, const nlohmann::json& list)
{
  std::string s = fmt::format("{} ({}):\n", what, list.size());
  for (const auto& t : list) {
    s += fmt::format("  {} [{}] {}\n", core::terminal_text(t.at("name").get<std::string>()),
                     fmt::join(t.at("shape").get<std::vector<std::int64_t>>(), ", "), t.at("dtype").get<std::string>());
  }
  return s;
}

std::string
findings_text(const char* what, const nlohmann::json& list)
{
  std::string s;
  for (const auto& f : list) {
    s += fmt::format("  {}: {}\n", what, finding_text(f));
  }
  return s;
}

// A safetensors file: data only, nothing of it runs.
nlohmann::json
inspect_safetensors(const fs::path& path)
{
  const core::SafetensorsFile file(path);
  const auto& st = file.content();
  nlohmann::json j = {{"format", "safetensors"}, {"verdict", "data"}};
  j["metadata"] = nlohmann::json::object();
  for (const auto& [k, v] : st.metadata) {
    if (k != "fedl.certificate" && k != "fedl.signature") {
      j["metadata"][core::valid_utf8(k, 200)] = core::valid_utf8(v, 200);
    }
  }
  j["tensors"] = nlohmann::json::array();
  for (const auto& t : st.tensors) {
    j["tensors"].push_back(
      {{"name", core::valid_utf8(t.name, 300)}, {"shape", t.shape}, {"dtype", core::dtype_name(t.dtype)}});
  }
  return j;
}

int
run_inspect(const InspectOptions& opt)
{
  if (!fs::is_regular_file(opt.model)) {
    throw core::UsageError("{} is not a file", opt.model.string());
  }
  const auto sha = core::file_sha256(opt.model);
  nlohmann::json j;
  if (is_zip(opt.model)) {
    // Nothing of the module runs: the backend reads its code, compiles it and walks it, in the
    // sandbox that the trainer would use, with this one file readable.
    core::SandboxPolicy policy = SandboxFlags{}.policy("fedl inspect");
    policy.read = {opt.model};
    enter_trainer_sandbox(std::move(policy));
    const auto [backend, device] = backends::resolve_device("torch");
    j = nlohmann::json::parse(backends::inspect_torchscript(*backend, opt.model));
  } else {
    j = inspect_safetensors(opt.model);
  }
  j["file"] = opt.model.string();
  j["sha256"] = sha;
  const auto verdict = j.at("verdict").get<std::string>();
  std::string text =
    fmt::format("{}: {}, SHA-256 {}\n", opt.model.string(),
                verdict == "data" ? "a safetensors file (data: nothing of it runs)" : "a TorchScript module", sha);
  if (verdict == "data") {
    for (const auto& [k, v] : j["metadata"].items()) {
      text += fmt::format("  {} = {}\n", core::terminal_text(k), core::terminal_text(v.get<std::string>()));
    }
    text += tensors_text("tensors", j["tensors"]);
  } else {
    text +=
      fmt::format("verdict: {} by fedl's allow-list (version {})\n", verdict, j.at("allow_list_version").get<int>());
    text += findings_text("refused", j["refused"]);
    text += findings_text("only without DP-SGD", j["needs_dp_off"]);
    text += tensors_text("parameters", j["parameters"]);
    text += tensors_text("buffers", j["buffers"]);
    std::size_t nodes = 0;
    std::string ops;
    for (const auto& [op, count] : j["operators"].items()) {
      nodes += count.get<std::size_t>();
      ops += fmt::format("  {} {}\n", core::terminal_text(op), count.get<std::size_t>());
    }
    text += fmt::format("operators ({} kinds, {} nodes):\n{}", j["operators"].size(), nodes, ops);
    text += fmt::format("methods ({}):\n", j["methods"].size());
    for (const auto& m : j["methods"]) {
      text += fmt::format("  {}\n", core::terminal_text(m.get<std::string>()));
    }
  }
  print_result(j, text);
  return verdict == "refused" ? static_cast<int>(core::ExitCode::verify) : 0;
}

} // namespace

Command
add_inspect(CLI::App& parent)
{
  auto opt = std::make_shared<InspectOptions>();
  auto* app = parent.add_subcommand(
    "inspect", "Show what a model file or TorchScript module holds, and whether fedl would run the module");
  app->add_option("model", opt->model, "A fedl model or update (safetensors) or a TorchScript module")
    ->required()
    ->type_name("FILE");
  return {app, [opt] { return run_inspect(*opt); }};
}

} // namespace fedl::cmd
