// SPDX-License-Identifier: Apache-2.0
// fedl audit WS: verify a workspace's history. The ledger's chain and every signature against
// the coordinator's certificate, that certificate against the federation CA, the CA, the
// coordinator certificate, fedl.json and the CRL against what the ledger recorded, and every
// model file against its recorded hash. Any mismatch is exit 3 naming the first broken entry
// or file; otherwise it prints the rounds, their participants, rejected updates and strategy.
// Privacy: every epsilon a round records (client-level and each site's) is recomputed from the
// recorded DP parameters of it and the rounds before; a disagreement is exit 3.
// --witness DIR...: sites' receipts of the ledger heads the coordinator showed them; a ledger
// shorter than, or diverging from, any of them is exit 3 (core/trust/receipt.hpp). Sites the ledger
// records as revoked must be in the CRL.
// fedl audit --privacy-calc: no workspace; the (ε, δ) that DP-SGD with the given sampling rate,
// noise multiplier and steps spends (core/math/accountant.hpp).
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "core/math/accountant.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <optional>
#include <set>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

void
expect_hash(const fs::path& path, const std::string& recorded, const core::LedgerEntry& e)
{
  if (!fs::exists(path)) {
    throw core::VerifyError("{} is missing (line {} of the ledger records it)", path.string(), e.line);
  }
  const auto actual = core::file_sha256(path);
  if (actual != recorded) {
    throw core::VerifyError("{} does not match the ledger (line {}, {} entry records SHA-256 {}, the file has {}): "
                            "it was replaced or altered",
                            path.string(), e.line, e.kind, recorded, actual);
  }
}

int
run_audit(const fs::path& root, const std::vector<fs::path>& witnesses)
{
  const core::Workspace ws(root);
  ws.require_exists();
  const auto ca = core::read_certificate(ws.ca_cert());
  const auto server = core::read_certificate(ws.server_cert());
  // First the chain alone (at a moment the certificate was surely valid), then the ledger.
  const auto issued = core::certificate_info(server).not_before + std::chrono::minutes(10);
  if (const auto v = core::verify_certificate(server, ca, nullptr, core::CertPurpose::server, issued); !v) {
    throw core::VerifyError("{}: {}", ws.server_cert().string(), v.reason);
  }
  const auto entries = core::read_ledger(ws.ledger(), core::ledger_verifier(server));
  // The coordinator's certificate must have been valid when it signed the last entry; it may
  // have expired since without making the history false.
  if (const auto v =
        core::verify_certificate(server, ca, nullptr, core::CertPurpose::server, core::parse_utc(entries.back().time));
      !v) {
    throw core::VerifyError("{}: {}", ws.server_cert().string(), v.reason);
  }
  const auto& genesis = entries.front();
  if (genesis.body.value("ca_fingerprint", "") != core::certificate_fingerprint(ca)) {
    throw core::VerifyError("{} is not the CA recorded in the ledger's genesis entry", ws.ca_cert().string());
  }
  if (genesis.body.value("server_fingerprint", "") != core::certificate_fingerprint(server)) {
    throw core::VerifyError("{} is not the coordinator certificate recorded in the genesis entry",
                            ws.server_cert().string());
  }

  std::string config_sha;
  const core::LedgerEntry* config_entry = nullptr;
  std::string crl_sha;
  const core::LedgerEntry* crl_entry = nullptr;
  std::string model = genesis.body.at("model").at("file").get<std::string>();
  expect_hash(ws.root() / model, genesis.body.at("model").at("sha256").get<std::string>(), genesis);
  std::string model_sha = genesis.body.at("model").at("sha256").get<std::string>();
  std::set<std::string> recorded_models{model};
  nlohmann::json rounds = nlohmann::json::array();
  std::string text;
  std::size_t rejected_total = 0;
  std::uint64_t expected_round = 1;
  core::FederationPrivacy privacy;
  std::optional<double> client_delta;
  nlohmann::json budget_stop;
  for (const auto& e : entries) {
    if (e.body.contains("config_sha256")) {
      config_sha = e.body["config_sha256"].get<std::string>();
      config_entry = &e;
    }
    if (e.body.contains("crl_sha256")) {
      crl_sha = e.body["crl_sha256"].get<std::string>();
      crl_entry = &e;
    }
    if (e.kind == "finished" && e.body.value("reason", "") == "privacy-budget") {
      budget_stop = e.body;
    }
    if (e.kind == "client-added") {
      text += fmt::format("site added: {}\n", e.body.value("name", "?"));
    } else if (e.kind == "revoked") {
      text += fmt::format("site revoked: {} (serial {})\n", e.body.value("name", "?"), e.body.value("serial", "?"));
    }
    if (e.kind != "round") {
      continue;
    }
    const auto r = e.body.at("round").get<std::uint64_t>();
    if (r != expected_round) {
      throw core::VerifyError("{}: line {} records round {} where round {} was expected", ws.ledger().string(), e.line,
                              r, expected_round);
    }
    ++expected_round;
    if (e.body.at("base").at("sha256").get<std::string>() != model_sha) {
      throw core::VerifyError("{}: line {}: round {} starts from a model other than the one before it",
                              ws.ledger().string(), e.line, r);
    }
    model = e.body.at("model").at("file").get<std::string>();
    model_sha = e.body.at("model").at("sha256").get<std::string>();
    expect_hash(ws.root() / model, model_sha, e);
    recorded_models.insert(model);
    std::vector<std::string> sites;
    for (const auto& p : e.body.at("participants")) {
      const auto site = p.value("site", "");
      sites.push_back(site.empty() ? p.value("file", "?") : site);
    }
    try {
      privacy.replay(e.body, /*verify=*/true);
    } catch (const core::VerifyError& err) {
      throw core::VerifyError("{}: line {}: {}", ws.ledger().string(), e.line, err.what());
    }
    if (const auto p = e.body.find("privacy"); p != e.body.end() && p->is_object() && p->contains("client")) {
      client_delta = (*p)["client"].value("delta", 1e-5);
    }
    const auto& rej = e.body.at("rejected");
    rejected_total += rej.size();
    std::string accuracy;
    if (const auto ev = e.body.find("evaluation");
        ev != e.body.end() && ev->is_object() && ev->contains("accuracy") && (*ev)["accuracy"].is_number()) {
      accuracy = fmt::format(", accuracy {:.2f}%", (*ev)["accuracy"].get<double>() * 100);
    }
    text += fmt::format("round {:>4}: {} ({} participants: {}){}{}{}\n", r, e.body.value("strategy", "?"), sites.size(),
                        fmt::join(sites, ", "), rej.empty() ? "" : fmt::format(", {} rejected", rej.size()), accuracy,
                        core::round_privacy_text(e.body));
    for (const auto& x : rej) {
      text += fmt::format("            rejected {}: {}\n", x.value("file", "?"), x.value("reason", "?"));
    }
    rounds.push_back({{"round", r},
                      {"strategy", e.body.value("strategy", "")},
                      {"participants", sites},
                      {"rejected", rej},
                      {"model", model},
                      {"time", e.time}});
  }
  if (config_entry != nullptr) {
    expect_hash(ws.config(), config_sha, *config_entry);
  }
  if (crl_entry != nullptr) {
    expect_hash(ws.crl(), crl_sha, *crl_entry);
  }
  core::check_revocations(ws, entries);
  nlohmann::json witness_json = nlohmann::json::array();
  std::string witness_text;
  if (!witnesses.empty()) {
    const auto last_sha = core::ledger_head(ws.ledger()).sha256;
    const auto ca_fp = core::certificate_fingerprint(ca);
    for (const auto& dir : witnesses) {
      const auto w = core::check_witness(dir, entries, last_sha, server, ca_fp);
      witness_json.push_back({{"dir", dir.string()}, {"receipts", w.receipts}, {"highest_seq", w.highest_seq}});
      witness_text += fmt::format("witness {}: {} receipts agree with the ledger{}\n", dir.string(), w.receipts,
                                  w.receipts > 0 ? fmt::format(" (up to entry {})", w.highest_seq) : std::string());
    }
  }
  // A model the ledger does not know is either a truncated ledger or an interrupted round;
  // both need a person (re-running the round's fedl aggregate records it).
  std::error_code ec;
  for (const auto& f : fs::directory_iterator(ws.models(), ec)) {
    const auto rel = "models/" + f.path().filename().string();
    if (recorded_models.count(rel) == 0) {
      throw core::VerifyError("{} is not recorded in the ledger: the ledger was truncated, or a round was "
                              "interrupted (run its fedl aggregate again)",
                              (ws.root() / rel).string());
    }
  }
  nlohmann::json j = {{"ok", true},
                      {"entries", entries.size()},
                      {"rounds", rounds},
                      {"latest_model", model},
                      {"rejected_updates", rejected_total},
                      {"ca_fingerprint", genesis.body["ca_fingerprint"]}};
  if (!witnesses.empty()) {
    j["witnesses"] = witness_json;
  }
  // The client-level total, recomputed at the delta the rounds recorded (each site's totals were
  // checked round by round above).
  nlohmann::json privacy_json = nlohmann::json::object();
  std::string privacy_summary;
  if (client_delta) {
    const auto spent = privacy.client().epsilon(*client_delta);
    privacy_json["client"] = {
      {"epsilon", spent.epsilon}, {"delta", *client_delta}, {"rounds", privacy.client_rounds()}};
    privacy_summary += fmt::format("privacy: client-level epsilon {:.4g} at delta {:g} over {} rounds (recomputed)\n",
                                   spent.epsilon, *client_delta, privacy.client_rounds());
  }
  if (!budget_stop.is_null()) {
    privacy_json["stopped"] = budget_stop;
    privacy_summary += fmt::format("privacy: stopped after round {}: the next round would have reached epsilon {:.4g}, "
                                   "past the budget of {:g}\n",
                                   budget_stop.value("round", 0), budget_stop.value("next_round_epsilon", 0.0),
                                   budget_stop.value("max_epsilon", 0.0));
  }
  if (!privacy_json.empty()) {
    j["privacy"] = privacy_json;
  }
  text = fmt::format("ledger: {} entries, chain and signatures verified; CA {}\n", entries.size(),
                     genesis.body["ca_fingerprint"].get<std::string>().substr(0, 16)) +
         text + privacy_summary + witness_text +
         fmt::format("{} rounds, latest model {}, {} rejected updates; every model file matches the ledger\n",
                     rounds.size(), model, rejected_total);
  print_result(j, text);
  return 0;
}

struct PrivacyCalc
{
  bool enabled = false;
  std::optional<double> sample_rate;
  std::optional<double> noise_multiplier;
  std::optional<std::uint64_t> steps;
  std::optional<double> delta;
};

int
run_privacy_calc(const PrivacyCalc& p)
{
  const auto spent = core::compute_epsilon(*p.sample_rate, *p.noise_multiplier, *p.steps, *p.delta);
  const nlohmann::json j = {{"epsilon", spent.epsilon},      {"delta", *p.delta},
                            {"order", spent.order},          {"steps", *p.steps},
                            {"sample_rate", *p.sample_rate}, {"noise_multiplier", *p.noise_multiplier}};
  print_result(j, fmt::format("epsilon {:.4f} (delta {}, best order {}) for {} steps at sample rate {}, "
                              "noise multiplier {}\n",
                              spent.epsilon, *p.delta, spent.order, *p.steps, *p.sample_rate, *p.noise_multiplier));
  return 0;
}

// The workspace is optional to CLI11 because --privacy-calc needs none; the two modes' flags
// are checked here so that each mistake gets a message saying what to add or drop.
int
dispatch(const std::optional<fs::path>& ws, const std::vector<fs::path>& witnesses, const PrivacyCalc& p)
{
  const std::vector<std::pair<const char*, bool>> calc_flags = {{"--sample-rate", p.sample_rate.has_value()},
                                                                {"--noise-multiplier", p.noise_multiplier.has_value()},
                                                                {"--steps", p.steps.has_value()},
                                                                {"--delta", p.delta.has_value()}};
  if (!p.enabled) {
    for (const auto& [flag, given] : calc_flags) {
      if (given) {
        throw core::UsageError("{} is only for --privacy-calc (fedl audit --privacy-calc --sample-rate Q "
                               "--noise-multiplier S --steps T --delta D)",
                               flag);
      }
    }
    if (!ws) {
      throw core::UsageError("fedl audit needs a workspace folder WS (or --privacy-calc to compute epsilon)");
    }
    return run_audit(*ws, witnesses);
  }
  if (!witnesses.empty()) {
    throw core::UsageError("--witness is for auditing a workspace, not for --privacy-calc");
  }
  if (ws) {
    throw core::UsageError("--privacy-calc takes no workspace (got {}): drop it, or drop --privacy-calc to audit it",
                           ws->string());
  }
  std::vector<std::string> missing;
  for (const auto& [flag, given] : calc_flags) {
    if (!given) {
      missing.emplace_back(flag);
    }
  }
  if (!missing.empty()) {
    throw core::UsageError("--privacy-calc needs {} (fedl audit --privacy-calc --sample-rate Q --noise-multiplier S "
                           "--steps T --delta D)",
                           fmt::join(missing, ", "));
  }
  return run_privacy_calc(p);
}

} // namespace

Command
add_audit(CLI::App& parent)
{
  auto ws = std::make_shared<std::optional<fs::path>>();
  auto calc = std::make_shared<PrivacyCalc>();
  auto witnesses = std::make_shared<std::vector<fs::path>>();
  auto* app = parent.add_subcommand("audit", "Verify a workspace's ledger, signatures, certificates and model files");
  app->add_option("workspace", *ws, "The workspace folder (required unless --privacy-calc)")->type_name("WS");
  app
    ->add_option("--witness", *witnesses,
                 "Check the ledger against the signed heads a site kept (its bundle folder); repeatable")
    ->type_name("DIR")
    ->expected(1, -1)
    ->check(CLI::ExistingDirectory);
  app->add_flag("--privacy-calc", calc->enabled,
                "Compute the (epsilon, delta) that DP-SGD spends instead of auditing a workspace");
  app->add_option("--sample-rate", calc->sample_rate, "With --privacy-calc: Poisson sampling rate, batch / samples")
    ->type_name("Q");
  app
    ->add_option("--noise-multiplier", calc->noise_multiplier,
                 "With --privacy-calc: noise standard deviation over the clipping norm")
    ->type_name("S");
  app->add_option("--steps", calc->steps, "With --privacy-calc: number of noisy gradient steps")->type_name("T");
  app->add_option("--delta", calc->delta, "With --privacy-calc: the delta of (epsilon, delta)")->type_name("D");
  return {app, [ws, witnesses, calc] { return dispatch(*ws, *witnesses, *calc); }};
}

} // namespace fedl::cmd
