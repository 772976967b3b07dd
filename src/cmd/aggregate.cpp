// SPDX-License-Identifier: Apache-2.0
// fedl aggregate: combine update files into the next global model with a strategy; with
// --workspace, check each update's site signature against the federation's CA and CRL, write
// models/global-NNNNNN.safetensors and append a signed ledger entry for the round.
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "core/aggregate.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/file_io.hpp"
#include "core/log.hpp"
#include "core/pki.hpp"
#include "core/workspace.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <set>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct AggregateOptions
{
  std::optional<fs::path> base;
  std::optional<fs::path> out;
  std::optional<fs::path> workspace;
  std::optional<std::string> strategy;
  std::optional<fs::path> state;
  std::optional<double> clip_norm;
  std::optional<double> server_lr, server_momentum, beta1, beta2, tau;
  std::string on_bad_update = "fail";
  std::vector<fs::path> updates;
};

struct Candidate
{
  fs::path path;
  std::optional<core::SafetensorsFile> file;
  std::string site;
  std::string fingerprint;
  std::uint64_t samples = 0;
  std::string sha256; // of the file's bytes when it was checked
};

// The federation's trust anchors, for checking site signatures.
struct Trust
{
  core::Cert ca;
  core::Crl crl;
};

// Why a signed update cannot be trusted, or nothing. Without `trust` (no workspace) an unsigned
// update is fine and a signed one is checked against its own certificate only.
std::optional<std::string>
check_identity(const core::Safetensors& st, const Trust* trust)
{
  const auto sig = st.meta("fedl.signature");
  const auto pem = st.meta("fedl.certificate");
  if (!sig || !pem) {
    if (trust != nullptr) {
      return "it is not signed by a site of this federation (make it with fedl train --identity clients/NAME)";
    }
    return std::nullopt;
  }
  core::Cert cert;
  try {
    cert = core::certificate_from_pem(*pem, "fedl.certificate");
  } catch (const core::Error& e) {
    return std::string("its certificate is unreadable: ") + e.what();
  }
  const auto info = core::certificate_info(cert);
  if (st.meta("fedl.site") != info.common_name) {
    return fmt::format("fedl.site does not match its certificate's name {}", info.common_name);
  }
  if (st.meta("fedl.cert_sha256") != info.fingerprint) {
    return "fedl.cert_sha256 does not match its certificate";
  }
  if (!core::verify_signature(cert, core::as_bytes(core::update_signed_payload(st.tensors, st.metadata)), *sig)) {
    return fmt::format("the signature of site {} does not verify (the file was changed after signing)",
                       info.common_name);
  }
  if (trust != nullptr) {
    const auto verdict = core::verify_certificate(cert, trust->ca, &trust->crl, core::CertPurpose::client);
    if (!verdict) {
      return fmt::format("the certificate of site {} is not valid here: {}", info.common_name, verdict.reason);
    }
  }
  return std::nullopt;
}

core::ServerOptions
server_options(const AggregateOptions& opt, const core::FederationConfig* config)
{
  core::ServerOptions o;
  if (config != nullptr) {
    o.server_lr = config->server_optimizer.lr;
    o.momentum = config->server_optimizer.momentum;
    o.beta1 = config->server_optimizer.beta1;
    o.beta2 = config->server_optimizer.beta2;
    o.tau = config->server_optimizer.tau;
  }
  o.server_lr = opt.server_lr.value_or(o.server_lr);
  o.momentum = opt.server_momentum.value_or(o.momentum);
  o.beta1 = opt.beta1.value_or(o.beta1);
  o.beta2 = opt.beta2.value_or(o.beta2);
  o.tau = opt.tau.value_or(o.tau);
  o.clip_norm = opt.clip_norm;
  core::validate_server_options(o);
  return o;
}

int
run_aggregate(const AggregateOptions& opt)
{
  std::optional<core::Workspace> ws;
  std::optional<core::FederationConfig> config;
  std::optional<Trust> trust;
  std::optional<core::WorkspaceLock> lock;
  std::string latest_sha; // the latest model's SHA-256 as the ledger records it
  std::uint64_t round = 0;
  fs::path base_path;
  fs::path out_path;
  if (opt.workspace) {
    ws.emplace(*opt.workspace);
    ws->require_exists();
    config = core::load_config(ws->config());
    if (opt.out || opt.state) {
      throw core::UsageError("with --workspace the new model goes to models/ and the server state to state/; "
                             "--out and --state are for aggregating outside a workspace");
    }
    lock.emplace(*ws);
    const auto latest = core::latest_model(core::read_workspace_ledger(*ws));
    round = latest.round + 1;
    latest_sha = latest.sha256;
    base_path = ws->root() / latest.file;
    if (opt.base && fs::weakly_canonical(*opt.base) != fs::weakly_canonical(base_path)) {
      throw core::UsageError("--base {} is not the workspace's latest model {}; leave --base out", opt.base->string(),
                             base_path.string());
    }
    out_path = ws->model(round);
    trust = Trust{core::read_certificate(ws->ca_cert()), core::read_crl(ws->crl())};
  } else {
    if (!opt.base || !opt.out) {
      throw core::UsageError("give --base MODEL and --out MODEL, or --workspace WS");
    }
    base_path = *opt.base;
    out_path = *opt.out;
  }
  const auto spec = core::parse_strategy(opt.strategy.value_or(config ? config->strategy : "fedavg"));
  const auto options = server_options(opt, config ? &*config : nullptr);
  const bool skip = opt.on_bad_update == "skip";

  const core::SafetensorsFile base(base_path);
  const auto base_sha = base.sha256();
  if (ws && base_sha != latest_sha) {
    throw core::VerifyError("{} does not match the ledger (SHA-256 {}, recorded {}): it was replaced or altered; "
                            "run fedl audit",
                            base_path.string(), base_sha, latest_sha);
  }
  std::vector<Candidate> accepted;
  nlohmann::json rejected = nlohmann::json::array();
  std::set<std::string> sites;
  std::set<std::string> contents;
  for (const auto& path : opt.updates) {
    Candidate c{path, std::nullopt, {}, {}, 0, {}};
    std::optional<std::string> reason;
    try {
      c.file.emplace(path);
      c.sha256 = core::file_sha256(path);
      if (!contents.insert(c.sha256).second) {
        reason = "the same update file is given twice";
      }
    } catch (const core::Error& e) {
      reason = e.what();
    }
    if (c.file) {
      const auto& st = c.file->content();
      if (!reason) {
        reason = core::validate_update(base.content(), base_sha, *c.file);
      }
      if (!reason) {
        reason = check_identity(st, trust ? &*trust : nullptr);
      }
      c.site = st.meta("fedl.site").value_or("");
      c.fingerprint = st.meta("fedl.cert_sha256").value_or("");
      if (!reason && !c.site.empty() && !sites.insert(c.site).second) {
        reason = fmt::format("site {} sent more than one update this round", c.site);
      }
      c.samples = core::update_num_samples(st).value_or(0);
    }
    if (reason) {
      if (!skip) {
        throw core::VerifyError("update {}: {}{}", path.string(), *reason,
                                " (give --on-bad-update skip to leave bad updates out)");
      }
      FEDL_LOG_WARN("leaving out {}: {}", path.string(), *reason);
      rejected.push_back({{"file", path.filename().string()}, {"site", c.site}, {"reason", *reason}});
      continue;
    }
    accepted.push_back(std::move(c));
  }
  if (accepted.empty()) {
    throw core::VerifyError("no update left to aggregate ({} rejected)", rejected.size());
  }

  // Server optimizer state: per round in a workspace, so that re-running an interrupted round
  // starts again from the same state.
  core::ServerState state;
  std::optional<fs::path> state_in;
  std::optional<fs::path> state_out;
  if (ws) {
    state_in = ws->state() / fmt::format("server-{:06}.safetensors", round - 1);
    state_out = ws->state() / fmt::format("server-{:06}.safetensors", round);
  } else if (opt.state) {
    state_in = state_out = *opt.state;
  }
  if (spec.stateful() && !state_in) {
    FEDL_LOG_WARN("{} keeps server optimizer state between rounds; without --state (or --workspace) each run "
                  "starts it afresh",
                  spec.to_string());
  }
  if (spec.stateful() && state_in && fs::exists(*state_in)) {
    state = core::load_server_state(*state_in, spec, base.content().tensors);
  }

  std::vector<const core::SafetensorsFile*> files;
  std::vector<double> weights;
  for (const auto& c : accepted) {
    files.push_back(&*c.file);
    weights.push_back(static_cast<double>(c.samples));
  }
  core::AggregateInfo info;
  const auto model = core::aggregate(base, files, weights, spec, options, state, &info);
  // The files are read through their mappings: one changed on disk after its signature was
  // checked must not pass unnoticed.
  for (const auto& c : accepted) {
    if (core::file_sha256(c.path) != c.sha256) {
      throw core::VerifyError("update {} changed while it was being aggregated; nothing was written",
                              c.path.string());
    }
  }
  core::Metadata meta = base.content().metadata;
  meta["fedl.kind"] = "model";
  meta["fedl.round"] = std::to_string(round);
  if (!ws) {
    meta.erase("fedl.round");
  }
  core::write_safetensors(out_path, core::views_of(model), meta);
  if (spec.stateful() && state_out) {
    core::save_server_state(*state_out, state);
  }

  nlohmann::json participants = nlohmann::json::array();
  for (std::size_t i = 0; i < accepted.size(); ++i) {
    const auto& c = accepted[i];
    participants.push_back({{"file", c.path.filename().string()},
                            {"site", c.site},
                            {"fingerprint", c.fingerprint},
                            {"num_samples", c.samples},
                            {"update_sha256", c.sha256}});
  }
  const core::SafetensorsFile written(out_path);
  nlohmann::json j = {{"model", out_path.string()},
                      {"sha256", written.sha256()},
                      {"strategy", spec.to_string()},
                      {"participants", participants},
                      {"rejected", rejected}};
  if (!info.selected.empty()) {
    j["selected"] = info.selected;
  }
  if (ws) {
    nlohmann::json opts = {{"server_lr", options.server_lr}, {"server_momentum", options.momentum},
                           {"beta1", options.beta1},         {"beta2", options.beta2},
                           {"tau", options.tau}};
    if (options.clip_norm) {
      opts["clip_norm"] = *options.clip_norm;
    }
    const nlohmann::json body = {{"round", round},
                                 {"strategy", spec.to_string()},
                                 {"options", opts},
                                 {"base", {{"file", fs::relative(base_path, ws->root()).string()}, {"sha256", base_sha}}},
                                 {"model", {{"file", core::Workspace::model_name(round)}, {"sha256", written.sha256()}}},
                                 {"participants", participants},
                                 {"rejected", rejected}};
    core::append_signed(*ws, "round", body);
    j["round"] = round;
    // The state two rounds back can no longer be needed for a re-run.
    std::error_code ec;
    if (round >= 2) {
      fs::remove(ws->state() / fmt::format("server-{:06}.safetensors", round - 2), ec);
    }
  }
  print_result(j, fmt::format("{}{} from {} updates ({} left out) with {}: {}\n",
                              ws ? fmt::format("round {}: ", round) : "", out_path.string(), accepted.size(),
                              rejected.size(), spec.to_string(), written.sha256()));
  return 0;
}

} // namespace

Command
add_aggregate(CLI::App& parent)
{
  auto opt = std::make_shared<AggregateOptions>();
  auto* app = parent.add_subcommand("aggregate", "Combine update files into the next global model");
  app->add_option("updates", opt->updates, "Update files (safetensors from fedl train --out)")
    ->required()
    ->type_name("UPDATE");
  app->add_option("--base", opt->base, "The model the updates were trained from (default with --workspace: the latest)")
    ->type_name("FILE");
  app->add_option("--out", opt->out, "Where to write the new model (not with --workspace)")->type_name("FILE");
  app->add_option("--workspace", opt->workspace, "Aggregate a round of this workspace: signed updates, ledger entry")
    ->type_name("DIR");
  app->add_option("--strategy", opt->strategy,
                  "fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean:BETA, krum:F, multi-krum:F,M")
    ->type_name("S");
  app->add_option("--state", opt->state, "Server optimizer state file, read and rewritten (not with --workspace)")
    ->type_name("FILE");
  app->add_option("--clip-norm", opt->clip_norm, "Scale each update down to this L2 norm first")
    ->check(CLI::PositiveNumber)
    ->type_name("C");
  app->add_option("--server-lr", opt->server_lr, "Server learning rate (default 1, or fedl.json)")->type_name("LR");
  app->add_option("--server-momentum", opt->server_momentum, "fedavgm momentum (default 0.9)")->type_name("M");
  app->add_option("--beta1", opt->beta1, "First-moment decay of fedadam/fedyogi/fedadagrad (default 0.9)")->type_name("B1");
  app->add_option("--beta2", opt->beta2, "Second-moment decay of fedadam/fedyogi (default 0.99)")
    ->type_name("B2");
  app->add_option("--tau", opt->tau, "Adaptivity of fedadam/fedyogi/fedadagrad (default 1e-3)")->type_name("TAU");
  with_choices(app->add_option("--on-bad-update", opt->on_bad_update, "Fail on a bad update, or skip it and report it")
                 ->capture_default_str(),
               {"fail", "skip"});
  return {app, [opt] { return run_aggregate(*opt); }};
}

} // namespace fedl::cmd
