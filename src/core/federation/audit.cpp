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
#include "core/util/text.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
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

// One audit: the walk over the ledger and what it found.
class Auditor
{
public:
  explicit Auditor(const Workspace& ws)
    : m_ws(ws), m_ca(read_certificate(ws.ca_cert())), m_server(read_certificate(ws.server_cert()))
  {
  }

  Audit run(const std::vector<fs::path>& witnesses);

private:
  void check_identity();
  void walk();
  void audit_round(const LedgerEntry& e);
  void audit_best(const LedgerEntry& e, std::uint64_t round);
  struct SecureSummary
  {
    std::string text;
    nlohmann::json summary; // null: the round had no secure aggregation
  };
  SecureSummary audit_secure_aggregation(const LedgerEntry& e, std::vector<std::string> sites) const;
  void check_files() const;
  void check_witnesses(const std::vector<fs::path>& witnesses);
  void summarize_privacy();

  const Workspace& m_ws;
  Cert m_ca;
  Cert m_server;
  std::vector<LedgerEntry> m_entries;
  LedgerState m_state;
  const LedgerEntry* m_config_entry = nullptr; // the last entry that records fedl.json's hash
  const LedgerEntry* m_crl_entry = nullptr;    // ... and the CRL's
  std::string m_model;                         // the latest model file, relative to the workspace
  std::string m_model_sha;
  std::set<std::string> m_recorded_models;
  std::optional<BestModel> m_best; // as the last round entry records it
  std::string m_best_model;        // the model file of the last best any round recorded, and its hash
  std::string m_best_sha;
  std::uint64_t m_expected_round = 1;
  std::size_t m_rejected = 0;
  nlohmann::json m_rounds = nlohmann::json::array();
  nlohmann::json m_result;
  std::string m_text;    // one line per round and per site added or revoked
  std::string m_privacy; // the privacy summary's lines
  std::string m_witness; // one line per witness
};

// The coordinator's certificate against the CA, the ledger's signatures against it, and both
// against what the genesis entry recorded.
void
Auditor::check_identity()
{
  // First the chain alone (at a moment the certificate was surely valid), then the ledger.
  const auto issued = certificate_info(m_server).not_before + std::chrono::minutes(10);
  if (const auto v = verify_certificate(m_server, m_ca, nullptr, CertPurpose::server, issued); !v) {
    throw VerifyError("{}: {}", m_ws.server_cert().string(), v.reason);
  }
  m_entries = read_ledger(m_ws.ledger(), ledger_verifier(m_server));
  // The coordinator's certificate must have been valid when it signed the last entry; it may
  // have expired since without making the history false.
  if (const auto v = verify_certificate(m_server, m_ca, nullptr, CertPurpose::server, parse_utc(m_entries.back().time));
      !v) {
    throw VerifyError("{}: {}", m_ws.server_cert().string(), v.reason);
  }
  const auto& genesis = m_entries.front();
  if (genesis.body.value("ca_fingerprint", "") != certificate_fingerprint(m_ca)) {
    throw VerifyError("{} is not the CA recorded in the ledger's genesis entry", m_ws.ca_cert().string());
  }
  if (genesis.body.value("server_fingerprint", "") != certificate_fingerprint(m_server)) {
    throw VerifyError("{} is not the coordinator certificate recorded in the genesis entry",
                      m_ws.server_cert().string());
  }
  m_model = genesis.body.at("model").at("file").get<std::string>();
  m_model_sha = genesis.body.at("model").at("sha256").get<std::string>();
  expect_hash(m_ws.root() / m_model, m_model_sha, genesis);
  m_recorded_models.insert(m_model);
}

void
Auditor::walk()
{
  for (const auto& e : m_entries) {
    try {
      m_state.apply(e, /*verify=*/true); // every epsilon recomputed
    } catch (const VerifyError& err) {
      throw VerifyError("{}: {}", m_ws.ledger().string(), err.what());
    }
    if (e.body.contains("config_sha256")) {
      m_config_entry = &e;
    }
    if (e.body.contains("crl_sha256")) {
      m_crl_entry = &e;
    }
    if (e.kind == "client-added") {
      m_text += fmt::format("site added: {}\n", e.body.value("name", "?"));
    } else if (e.kind == "revoked") {
      m_text += fmt::format("site revoked: {} (serial {})\n", e.body.value("name", "?"), e.body.value("serial", "?"));
    } else if (e.kind == "round") {
      audit_round(e);
    }
  }
}

// A round's figures for --json, as its entry recorded them (null, or empty, where an older fedl
// or the round's settings recorded none): the evaluation's accuracy and loss, the client-level
// epsilon after it and each site's total, each site's report, the round's seconds, who was asked,
// dropped or late.
void
add_round_metrics(const nlohmann::json& body, nlohmann::json& row)
{
  const auto get = [&body](const char* key, nlohmann::json fallback) {
    const auto it = body.find(key);
    return it == body.end() ? fallback : *it;
  };
  const auto number = [](const nlohmann::json& obj, const char* key) {
    return obj.is_object() && obj.contains(key) && obj[key].is_number() ? obj[key] : nlohmann::json(nullptr);
  };
  const auto evaluation = get("evaluation", nullptr);
  row["accuracy"] = number(evaluation, "accuracy");
  row["loss"] = number(evaluation, "loss");
  const auto privacy = get("privacy", nullptr);
  const auto epsilon = round_client_epsilon(body);
  row["epsilon"] = epsilon ? nlohmann::json(*epsilon) : nlohmann::json(nullptr);
  nlohmann::json sites = nlohmann::json::object();
  if (privacy.is_object() && privacy.contains("sites") && privacy["sites"].is_object()) {
    for (const auto& [name, r] : privacy["sites"].items()) {
      sites[name] = number(r, "total_epsilon");
    }
  }
  row["site_epsilon"] = sites;
  row["site_metrics"] = get("site_metrics", nlohmann::json::object());
  row["seconds"] = number(body, "seconds");
  row["asked"] = get("asked", nullptr);
  row["dropped"] = get("dropped", nlohmann::json::array());
  row["late"] = get("late", nlohmann::json::array());
  row["federated_evaluation"] = get("federated_evaluation", nullptr);
}

// A round entry: the next number, from the model before it, to a model file that matches.
void
Auditor::audit_round(const LedgerEntry& e)
{
  const auto r = e.body.at("round").get<std::uint64_t>();
  if (r != m_expected_round) {
    throw VerifyError("{}: line {} records round {} where round {} was expected", m_ws.ledger().string(), e.line, r,
                      m_expected_round);
  }
  ++m_expected_round;
  if (e.body.at("base").at("sha256").get<std::string>() != m_model_sha) {
    throw VerifyError("{}: line {}: round {} starts from a model other than the one before it", m_ws.ledger().string(),
                      e.line, r);
  }
  m_model = e.body.at("model").at("file").get<std::string>();
  m_model_sha = e.body.at("model").at("sha256").get<std::string>();
  expect_hash(m_ws.root() / m_model, m_model_sha, e);
  m_recorded_models.insert(m_model);
  std::vector<std::string> sites;
  for (const auto& p : e.body.at("participants")) {
    const auto site = p.value("site", "");
    sites.push_back(site.empty() ? p.value("file", "?") : site);
  }
  const auto& rej = e.body.at("rejected");
  m_rejected += rej.size();
  const std::string accuracy =
    m_state.accuracy ? fmt::format(", accuracy {:.2f}%", *m_state.accuracy * 100) : std::string();
  const auto secure = audit_secure_aggregation(e, sites);
  m_text += fmt::format("round {:>4}: {} ({}: {}){}{}{}{}\n", r, e.body.value("strategy", "?"),
                        count_of(sites.size(), "participant"), fmt::join(sites, ", "),
                        rej.empty() ? "" : fmt::format(", {} rejected", rej.size()), accuracy,
                        round_privacy_text(e.body), secure.text);
  for (const auto& x : rej) {
    m_text += fmt::format("            rejected {}: {}\n", x.value("file", "?"), x.value("reason", "?"));
  }
  m_rounds.push_back({{"round", r},
                      {"strategy", e.body.value("strategy", "")},
                      {"options", round_options(e, m_ws)},
                      {"participants", sites},
                      {"rejected", rej},
                      {"model", m_model},
                      {"time", e.time}});
  add_round_metrics(e.body, m_rounds.back());
  audit_best(e, r);
  if (!secure.summary.is_null()) {
    m_rounds.back()["secure_aggregation"] = secure.summary;
  }
}

// A round's "best": the one the evaluations so far make best by its metric (the earlier best, or
// this round if it beats it), as the coordinator computes it (next_best).
void
Auditor::audit_best(const LedgerEntry& e, std::uint64_t round)
{
  const auto it = e.body.find("best");
  if (it == e.body.end()) {
    m_best.reset(); // a coordinator without evaluation data: the next one starts afresh
    return;
  }
  const auto best = BestModel::from_json(*it);
  if (!best) {
    throw VerifyError("{}: line {}: round {}'s best is not {{round, metric, value}} of a known metric ({})",
                      m_ws.ledger().string(), e.line, round, best_metric_names());
  }
  const auto expected =
    next_best(m_best, *parse_best_metric(best->metric), round, e.body.value("evaluation", nlohmann::json()));
  if (!expected || expected->round != best->round || expected->value != best->value) {
    throw VerifyError("{}: line {}: round {} records round {} as the best by {} ({}), but the evaluations say {}",
                      m_ws.ledger().string(), e.line, round, best->round, best->metric, best->value,
                      expected ? fmt::format("round {} ({})", expected->round, expected->value)
                               : std::string("there is none"));
  }
  if (best->round == round) {
    m_best_model = m_model;
    m_best_sha = m_model_sha;
  }
  m_best = best;
  m_rounds.back()["best"] = best->to_json();
}

// A round's "secure_aggregation" record, if it has one: its survivors are the round's
// participants, every masked input is a survivor's with a SHA-256, and at least t survived. The
// text for the round's line and the summary for --json.
Auditor::SecureSummary
Auditor::audit_secure_aggregation(const LedgerEntry& e, std::vector<std::string> sites) const
{
  const auto it = e.body.find("secure_aggregation");
  if (it == e.body.end()) {
    return {};
  }
  const auto& sa = *it;
  const auto bad = [&](const std::string& what) {
    return VerifyError("{}: line {}: round {}'s secure_aggregation {}", m_ws.ledger().string(), e.line,
                       e.body.at("round").get<std::uint64_t>(), what);
  };
  auto survivors = sa.at("survivors").get<std::vector<std::string>>();
  std::sort(survivors.begin(), survivors.end());
  std::sort(sites.begin(), sites.end());
  if (survivors != sites) {
    throw bad("names other survivors than the round's participants");
  }
  std::set<std::string> masked;
  for (const auto& m : sa.at("masked_inputs")) {
    if (m.at("sha256").get<std::string>().size() != 64 || !masked.insert(m.at("site").get<std::string>()).second) {
      throw bad("lists a masked input twice or without its SHA-256");
    }
  }
  if (masked != std::set<std::string>(survivors.begin(), survivors.end())) {
    throw bad("lists masked inputs of other sites than its survivors");
  }
  const auto t = sa.at("threshold").get<std::uint64_t>();
  if (survivors.size() < t) {
    throw bad(fmt::format("has {} survivors, below its threshold {}", survivors.size(), t));
  }
  const auto after = sa.at("dropped_after_masking").get<std::vector<std::string>>();
  SecureSummary out;
  out.text =
    fmt::format(", secure aggregation (threshold {}, {} neighbours{})", t, sa.at("neighbours").get<std::uint64_t>(),
                after.empty() ? std::string() : fmt::format(", unmasked for {}", fmt::join(after, ", ")));
  out.summary = {
    {"threshold", t}, {"neighbours", sa.at("neighbours")}, {"survivors", survivors}, {"dropped_after_masking", after}};
  return out;
}

// fedl.json and the CRL as last recorded, revocations in the CRL, and no model file the ledger
// does not know.
void
Auditor::check_files() const
{
  if (m_config_entry != nullptr) {
    expect_hash(m_ws.config(), m_config_entry->body["config_sha256"].get<std::string>(), *m_config_entry);
  }
  if (m_crl_entry != nullptr) {
    expect_hash(m_ws.crl(), m_crl_entry->body["crl_sha256"].get<std::string>(), *m_crl_entry);
  }
  check_revocations(m_ws, m_entries);
  // A model the ledger does not know is either a truncated ledger or an interrupted round;
  // both need a person (re-running the round's fedl aggregate records it).
  std::error_code ec;
  for (const auto& f : fs::directory_iterator(m_ws.models(), ec)) {
    const auto rel = "models/" + f.path().filename().string();
    if (f.path() == m_ws.best_model()) {
      if (m_best_sha.empty()) {
        throw VerifyError("{} exists but no round records a best model", f.path().string());
      }
      if (const auto actual = file_sha256(f.path()); actual != m_best_sha) {
        throw VerifyError("{} is not the best model the ledger records ({}, SHA-256 {}): it has SHA-256 {}",
                          f.path().string(), m_best_model, m_best_sha, actual);
      }
      continue;
    }
    if (m_recorded_models.count(rel) == 0) {
      throw VerifyError("{} is not recorded in the ledger: the ledger was truncated, or a round was "
                        "interrupted (run its fedl aggregate again)",
                        (m_ws.root() / rel).string());
    }
  }
}

void
Auditor::check_witnesses(const std::vector<fs::path>& witnesses)
{
  if (witnesses.empty()) {
    return;
  }
  auto& out = m_result["witnesses"] = nlohmann::json::array();
  const auto last_sha = ledger_head(m_ws.ledger()).sha256;
  const auto ca_fp = certificate_fingerprint(m_ca);
  for (const auto& dir : witnesses) {
    const auto w = check_witness(dir, m_entries, last_sha, m_server, ca_fp);
    out.push_back({{"dir", dir.string()}, {"receipts", w.receipts}, {"highest_seq", w.highest_seq}});
    m_witness += fmt::format("witness {}: {} receipts agree with the ledger{}\n", dir.string(), w.receipts,
                             w.receipts > 0 ? fmt::format(" (up to entry {})", w.highest_seq) : std::string());
  }
}

// The client-level total, recomputed at the delta the rounds recorded (each site's totals were
// checked round by round), and a stop for the budget.
void
Auditor::summarize_privacy()
{
  try {
    m_state.privacy.finish_verify();
  } catch (const VerifyError& err) {
    throw VerifyError("{}: {}", m_ws.ledger().string(), err.what());
  }
  nlohmann::json out = nlohmann::json::object();
  if (!m_state.client_dp.is_null()) {
    const double delta = m_state.client_dp["client"].value("delta", 1e-5);
    const auto& privacy = m_state.privacy;
    const auto accountant = privacy.accountant().value_or(Accountant::rdp_v1);
    const auto spent = privacy.client().epsilon(delta, accountant);
    out["client"] = {{"epsilon", spent.epsilon},
                     {"delta", delta},
                     {"rounds", privacy.client_rounds()},
                     {"accountant", accountant_name(accountant)}};
    m_privacy += fmt::format("privacy: client-level epsilon {:.4g} at delta {:g} over {} rounds (recomputed, {})\n",
                             spent.epsilon, delta, privacy.client_rounds(), accountant_name(accountant));
  }
  if (const auto& stop = m_state.budget_stop; !stop.is_null()) {
    out["stopped"] = stop;
    m_privacy +=
      fmt::format("privacy: stopped after round {}: the next round would have reached epsilon {:.4g}, "
                  "past the budget of {:g}\n",
                  stop.value("round", 0), stop.value("next_round_epsilon", 0.0), stop.value("max_epsilon", 0.0));
  }
  if (!out.empty()) {
    m_result["privacy"] = std::move(out);
  }
}

Audit
Auditor::run(const std::vector<fs::path>& witnesses)
{
  check_identity();
  walk();
  check_files();
  const auto& ca_fingerprint = m_entries.front().body["ca_fingerprint"];
  m_result = {{"ok", true},
              {"entries", m_entries.size()},
              {"rounds", m_rounds},
              {"latest_model", m_model},
              {"rejected_updates", m_rejected},
              {"ca_fingerprint", ca_fingerprint}};
  if (m_best) {
    auto best = m_best->to_json();
    best["model"] = m_ws.model_name(m_best->round);
    best["file"] = fs::exists(m_ws.best_model()) ? nlohmann::json("models/best.safetensors") : nlohmann::json(nullptr);
    m_result["best"] = std::move(best);
    m_text += fmt::format("best model: round {} by {} {:.6g}{}\n", m_best->round, m_best->metric, m_best->value,
                          fs::exists(m_ws.best_model()) ? " (models/best.safetensors)" : "");
  }
  check_witnesses(witnesses);
  summarize_privacy();
  auto text = fmt::format("ledger: {} entries, chain and signatures verified; CA {}\n", m_entries.size(),
                          ca_fingerprint.get<std::string>().substr(0, 16)) +
              m_text + m_privacy + m_witness +
              fmt::format("{}, latest model {}, {}; every model file matches the ledger\n",
                          count_of(m_rounds.size(), "round"), m_model, count_of(m_rejected, "rejected update"));
  return {std::move(m_result), std::move(text)};
}

} // namespace

Audit
audit_workspace(const Workspace& ws, const std::vector<fs::path>& witnesses)
{
  ws.require_exists();
  return Auditor(ws).run(witnesses);
}

} // namespace fedl::core
