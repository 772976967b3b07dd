// SPDX-License-Identifier: Apache-2.0
#include "core/federation/audit.hpp"

#include "core/federation/ledger_state.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/receipt.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <set>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

void
expect_hash(const fs::path& path, const std::string& recorded, const LedgerEntry& e)
{
  if (!fs::exists(path)) {
    throw VerifyError("{} is missing (line {} of the ledger records it)", path.string(), e.line);
  }
  const auto actual = file_sha256(path);
  if (actual != recorded) {
    throw VerifyError("{} does not match the ledger (line {}, {} entry records SHA-256 {}, the file has {}): "
                      "it was replaced or altered",
                      path.string(), e.line, e.kind, recorded, actual);
  }
}

// A round entry's server-side options in today's names, whichever names it was written with.
nlohmann::json
round_options(const LedgerEntry& e, const Workspace& ws)
{
  const auto it = e.body.find("options");
  if (it == e.body.end()) {
    return nullptr;
  }
  try {
    auto options = to_json(server_optimizer_from_json(
      *it, "options", fmt::format("{}: line {}", ws.ledger().string(), e.line), {"clip_norm"}));
    if (it->contains("clip_norm")) {
      options["clip_norm"] = (*it)["clip_norm"];
    }
    return options;
  } catch (const UsageError& err) {
    throw VerifyError("{}", err.what());
  }
}

} // namespace

Audit
audit_workspace(const Workspace& ws, const std::vector<fs::path>& witnesses)
{
  ws.require_exists();
  const auto ca = read_certificate(ws.ca_cert());
  const auto server = read_certificate(ws.server_cert());
  // First the chain alone (at a moment the certificate was surely valid), then the ledger.
  const auto issued = certificate_info(server).not_before + std::chrono::minutes(10);
  if (const auto v = verify_certificate(server, ca, nullptr, CertPurpose::server, issued); !v) {
    throw VerifyError("{}: {}", ws.server_cert().string(), v.reason);
  }
  const auto entries = read_ledger(ws.ledger(), ledger_verifier(server));
  // The coordinator's certificate must have been valid when it signed the last entry; it may
  // have expired since without making the history false.
  if (const auto v = verify_certificate(server, ca, nullptr, CertPurpose::server, parse_utc(entries.back().time)); !v) {
    throw VerifyError("{}: {}", ws.server_cert().string(), v.reason);
  }
  const auto& genesis = entries.front();
  if (genesis.body.value("ca_fingerprint", "") != certificate_fingerprint(ca)) {
    throw VerifyError("{} is not the CA recorded in the ledger's genesis entry", ws.ca_cert().string());
  }
  if (genesis.body.value("server_fingerprint", "") != certificate_fingerprint(server)) {
    throw VerifyError("{} is not the coordinator certificate recorded in the genesis entry", ws.server_cert().string());
  }

  std::string config_sha;
  const LedgerEntry* config_entry = nullptr;
  std::string crl_sha;
  const LedgerEntry* crl_entry = nullptr;
  std::string model = genesis.body.at("model").at("file").get<std::string>();
  expect_hash(ws.root() / model, genesis.body.at("model").at("sha256").get<std::string>(), genesis);
  std::string model_sha = genesis.body.at("model").at("sha256").get<std::string>();
  std::set<std::string> recorded_models{model};
  nlohmann::json rounds = nlohmann::json::array();
  std::string text;
  std::size_t rejected_total = 0;
  std::uint64_t expected_round = 1;
  LedgerState state;
  for (const auto& e : entries) {
    try {
      state.apply(e, /*verify=*/true); // every epsilon recomputed
    } catch (const VerifyError& err) {
      throw VerifyError("{}: {}", ws.ledger().string(), err.what());
    }
    if (e.body.contains("config_sha256")) {
      config_sha = e.body["config_sha256"].get<std::string>();
      config_entry = &e;
    }
    if (e.body.contains("crl_sha256")) {
      crl_sha = e.body["crl_sha256"].get<std::string>();
      crl_entry = &e;
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
      throw VerifyError("{}: line {} records round {} where round {} was expected", ws.ledger().string(), e.line, r,
                        expected_round);
    }
    ++expected_round;
    if (e.body.at("base").at("sha256").get<std::string>() != model_sha) {
      throw VerifyError("{}: line {}: round {} starts from a model other than the one before it", ws.ledger().string(),
                        e.line, r);
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
    const auto& rej = e.body.at("rejected");
    rejected_total += rej.size();
    const std::string accuracy =
      state.accuracy ? fmt::format(", accuracy {:.2f}%", *state.accuracy * 100) : std::string();
    text += fmt::format("round {:>4}: {} ({} participants: {}){}{}{}\n", r, e.body.value("strategy", "?"), sites.size(),
                        fmt::join(sites, ", "), rej.empty() ? "" : fmt::format(", {} rejected", rej.size()), accuracy,
                        round_privacy_text(e.body));
    for (const auto& x : rej) {
      text += fmt::format("            rejected {}: {}\n", x.value("file", "?"), x.value("reason", "?"));
    }
    rounds.push_back({{"round", r},
                      {"strategy", e.body.value("strategy", "")},
                      {"options", round_options(e, ws)},
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
  check_revocations(ws, entries);
  nlohmann::json witness_json = nlohmann::json::array();
  std::string witness_text;
  if (!witnesses.empty()) {
    const auto last_sha = ledger_head(ws.ledger()).sha256;
    const auto ca_fp = certificate_fingerprint(ca);
    for (const auto& dir : witnesses) {
      const auto w = check_witness(dir, entries, last_sha, server, ca_fp);
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
      throw VerifyError("{} is not recorded in the ledger: the ledger was truncated, or a round was "
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
  if (!state.client_dp.is_null()) {
    const double delta = state.client_dp["client"].value("delta", 1e-5);
    const auto& privacy = state.privacy;
    const auto spent = privacy.client().epsilon(delta);
    privacy_json["client"] = {{"epsilon", spent.epsilon}, {"delta", delta}, {"rounds", privacy.client_rounds()}};
    privacy_summary += fmt::format("privacy: client-level epsilon {:.4g} at delta {:g} over {} rounds (recomputed)\n",
                                   spent.epsilon, delta, privacy.client_rounds());
  }
  if (const auto& budget_stop = state.budget_stop; !budget_stop.is_null()) {
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
  return {std::move(j), std::move(text)};
}

} // namespace fedl::core
