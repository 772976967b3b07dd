// SPDX-License-Identifier: Apache-2.0
#include "core/privacy/privacy.hpp"

#include "core/trust/ledger.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using nlohmann::json;

// A run's epsilon alone.
double
run_epsilon(const DpSgdReport& r, Accountant a)
{
  const GaussianSteps part{r.sample_rate, r.noise_multiplier, r.steps};
  return account_epsilon(a, {&part, 1}, r.delta).epsilon;
}

// A JSON value for a message: its text cut to 200 bytes, or only its type and size if it holds
// arrays or objects. A site's fedl.dp is JSON text of any nesting, and dump() recurses once per
// level: a 200 KB "[[[...]]]" overflowed the stack of the coordinator's validation thread.
std::string
brief(const json& j)
{
  if (j.is_structured() && std::any_of(j.begin(), j.end(), [](const json& v) { return v.is_structured(); })) {
    return fmt::format("(an {} of {} entries, some nested)", j.type_name(), j.size());
  }
  return valid_utf8(j.dump(-1, ' ', false, json::error_handler_t::replace), 200);
}

bool
same(double recorded, double computed)
{
  return std::abs(recorded - computed) <= 1e-9 * std::max(1.0, std::abs(computed));
}

double
number(const json& j, const char* key, const std::string& what)
{
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number() || !std::isfinite(it->get<double>())) {
    throw VerifyError("{}: {} is missing or not a finite number", what, key);
  }
  return it->get<double>();
}

std::uint64_t
count(const json& j, const char* key, const std::string& what)
{
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned()) {
    throw VerifyError("{}: {} is missing or not a non-negative integer", what, key);
  }
  return it->get<std::uint64_t>();
}

} // namespace

void
PrivacyAccount::add(double q, double sigma, std::uint64_t steps)
{
  if (steps == 0) {
    return;
  }
  // Saturating: counts that a peer reports could otherwise wrap around to fewer steps.
  auto& total = m_steps[{q, sigma}];
  total = steps > UINT64_MAX - total ? UINT64_MAX : total + steps;
}

void
PrivacyAccount::merge_max(const PrivacyAccount& other)
{
  for (const auto& [key, steps] : other.m_steps) {
    auto& mine = m_steps[key];
    mine = std::max(mine, steps);
  }
}

std::vector<GaussianSteps>
PrivacyAccount::parts() const
{
  std::vector<GaussianSteps> out;
  for (const auto& [key, steps] : m_steps) {
    out.push_back({key.first, key.second, steps});
  }
  return out;
}

PrivacySpent
PrivacyAccount::epsilon(double delta, Accountant a) const
{
  if (m_steps.empty()) {
    return {};
  }
  const auto p = parts();
  return account_epsilon(a, p, delta);
}

json
PrivacyAccount::to_json() const
{
  json mechanisms = json::array();
  for (const auto& [key, steps] : m_steps) {
    mechanisms.push_back({{"sample_rate", key.first}, {"noise_multiplier", key.second}, {"steps", steps}});
  }
  return {{"mechanisms", std::move(mechanisms)}};
}

PrivacyAccount
PrivacyAccount::from_json(const json& j, const std::string& what)
{
  const auto it = j.is_object() ? j.find("mechanisms") : j.end();
  if (!j.is_object() || it == j.end() || !it->is_array()) {
    throw Error("{}: not a privacy account ({{\"mechanisms\": [...]}}): {}", what, brief(j));
  }
  if (it->size() > 4 * max_mechanisms) {
    throw Error("{}: {} mechanisms, more than the {} distinct ones an account may hold", what, it->size(),
                max_mechanisms);
  }
  PrivacyAccount a;
  for (const auto& m : *it) {
    const auto w = what + ": mechanism";
    if (!m.is_object()) {
      throw Error("{}: not a JSON object: {}", w, brief(m));
    }
    const double q = number(m, "sample_rate", w);
    const double sigma = number(m, "noise_multiplier", w);
    const auto steps = count(m, "steps", w);
    if (!(q > 0 && q <= 1) || !(sigma > 0)) {
      throw Error("{}: sample rate {} or noise multiplier {} out of range", w, q, sigma);
    }
    a.add(q, sigma, steps);
    if (a.m_steps.size() > max_mechanisms) {
      throw Error("{}: more than the {} distinct mechanisms an account may hold", what, max_mechanisms);
    }
  }
  return a;
}

json
DpSgdReport::to_json() const
{
  return {{"noise_multiplier", noise_multiplier},
          {"max_grad_norm", max_grad_norm},
          {"sample_rate", sample_rate},
          {"steps", steps},
          {"delta", delta},
          {"epsilon", epsilon}};
}

DpSgdReport
DpSgdReport::from_json(const json& j, const std::string& what, Accountant accountant)
{
  if (!j.is_object()) {
    throw VerifyError("{}: not a JSON object: {}", what, brief(j));
  }
  DpSgdReport r;
  r.noise_multiplier = number(j, "noise_multiplier", what);
  r.max_grad_norm = number(j, "max_grad_norm", what);
  r.sample_rate = number(j, "sample_rate", what);
  r.steps = count(j, "steps", what);
  r.delta = number(j, "delta", what);
  if (!(r.noise_multiplier > 0) || !(r.max_grad_norm > 0) || !(r.sample_rate > 0 && r.sample_rate <= 1) ||
      !(r.delta > 0 && r.delta < 1)) {
    throw VerifyError("{}: DP-SGD parameters out of range: {}", what, brief(j));
  }
  r.epsilon = run_epsilon(r, accountant);
  if (!std::isfinite(r.epsilon)) {
    throw VerifyError("{}: these DP-SGD parameters spend an infinite epsilon: {}", what, brief(j));
  }
  return r;
}

DpSgdReport
dp_sgd_report(const DpSgdConfig& dp, std::uint64_t samples, std::uint32_t batch_size, std::uint64_t steps)
{
  if (samples == 0 || batch_size > samples) {
    throw UsageError(
      "--batch-size {} is larger than the {} samples: DP-SGD samples each example with rate batch size / "
      "samples, which must not exceed 1; lower --batch-size",
      batch_size, samples);
  }
  DpSgdReport r;
  r.noise_multiplier = dp.noise_multiplier;
  r.max_grad_norm = dp.max_grad_norm;
  r.sample_rate = static_cast<double>(batch_size) / static_cast<double>(samples);
  r.steps = steps;
  r.delta = dp.delta;
  r.epsilon = run_epsilon(r, dp.accountant);
  return r;
}

namespace {

// 1, 8, 64, 512 ...: where a PLD account's recorded total is recomputed in the replay.
bool
power_of_eight(std::uint64_t n)
{
  return n != 0 && (n & (n - 1)) == 0 && std::countr_zero(n) % 3 == 0;
}

} // namespace

namespace {

// Recomputes an account's total and holds the recorded one to it and to the budget; the total.
double
check_recomputed(const PrivacyAccount& spent, double recorded, double delta, Accountant a,
                 std::optional<double> max_epsilon, const std::string& what)
{
  const auto e = spent.epsilon(delta, a).epsilon;
  if (!same(recorded, e)) {
    throw VerifyError("{}: records epsilon {} but its parameters and the rounds before give {} ({})", what, recorded, e,
                      accountant_name(a));
  }
  if (max_epsilon && e > *max_epsilon * (1 + 1e-9)) {
    throw VerifyError("{}: epsilon {} is past the budget of {} that the round records", what, e, *max_epsilon);
  }
  return e;
}

} // namespace

void
FederationPrivacy::verify_total(Account& account, double recorded, double delta, Accountant a,
                                std::optional<double> max_epsilon, const std::string& what)
{
  if (a != Accountant::pld_v1 || power_of_eight(account.runs)) {
    account.floor = check_recomputed(account.spent, recorded, delta, a, max_epsilon, what);
    account.floor_delta = delta;
    account.floor_accountant = a;
    account.pending.reset();
    return;
  }
  // Between recomputed rounds: at least what was spent by the last one, within the budget, and
  // recomputed in finish_verify() if it is the account's last.
  if (delta == account.floor_delta && a == account.floor_accountant && recorded < account.floor * (1 - 1e-9)) {
    throw VerifyError("{}: records epsilon {}, less than the {} recomputed for an earlier round", what, recorded,
                      account.floor);
  }
  if (max_epsilon && recorded > *max_epsilon * (1 + 1e-9)) {
    throw VerifyError("{}: epsilon {} is past the budget of {} that the round records", what, recorded, *max_epsilon);
  }
  account.pending = Account::Pending{recorded, delta, a, max_epsilon, what};
}

void
FederationPrivacy::finish_verify()
{
  const auto check = [](Account& account) {
    if (const auto p = std::exchange(account.pending, std::nullopt)) {
      check_recomputed(account.spent, p->recorded, p->delta, p->accountant, p->max_epsilon, p->what);
    }
  };
  check(m_client);
  for (auto& [name, site] : m_sites) {
    check(site);
  }
}

void
FederationPrivacy::replay(const json& body, bool verify)
{
  const auto it = body.find("privacy");
  if (it == body.end() || it->is_null()) {
    return;
  }
  // Only for messages; read without converting, since a float or a string here would make
  // value<std::uint64_t>() undefined behaviour or a json exception instead of a VerifyError.
  const auto r = body.find("round");
  const auto what =
    fmt::format("round {}: privacy", r != body.end() && r->is_number_integer() ? r->dump() : std::string("?"));
  const auto& p = *it;
  if (!p.is_object()) {
    throw VerifyError("{}: not a JSON object", what);
  }
  // Rounds before December 2026 name no accountant: they used RDP at the legacy orders.
  auto accountant = Accountant::rdp_v1;
  if (const auto a = p.find("accountant"); a != p.end()) {
    const auto known = a->is_string() ? accountant_from_name(a->get<std::string>()) : std::nullopt;
    if (!known) {
      throw VerifyError("{}: accountant {} is not one this fedl knows (rdp-v1, rdp-v2, pld-v1): audit it with the "
                        "fedl that wrote it",
                        what, brief(*a));
    }
    accountant = *known;
  }
  if (m_accountant && *m_accountant != accountant) {
    const auto from = p.find("accountant_changed_from");
    if (from == p.end() || !from->is_string() || *from != accountant_name(*m_accountant)) {
      throw VerifyError("{}: accounts with {} after rounds accounted with {}, and does not record the change "
                        "(accountant_changed_from)",
                        what, accountant_name(accountant), accountant_name(*m_accountant));
    }
  }
  m_accountant = accountant;
  std::optional<double> max_epsilon;
  if (const auto m = p.find("max_epsilon"); m != p.end() && m->is_number()) {
    max_epsilon = m->get<double>();
  }
  if (const auto c = p.find("client"); c != p.end()) {
    const auto w = what + ".client";
    const double q = number(*c, "sample_rate", w);
    const double z = number(*c, "noise_multiplier", w);
    const double delta = number(*c, "delta", w);
    if (!(q > 0 && q <= 1) || !(z > 0) || !(delta > 0 && delta < 1) || !(number(*c, "clip_norm", w) > 0)) {
      throw VerifyError("{}: parameters out of range: {}", w, brief(*c));
    }
    // Rounds before December 2026 record no selection (it was seeded, yet amplified: they still
    // audit as they were recorded).
    if (const auto sel = c->find("selection"); sel != c->end()) {
      if (!sel->is_string() || (*sel != "all" && *sel != "secret" && *sel != "seeded")) {
        throw VerifyError("{}: selection {} is not all, secret or seeded", w, brief(*sel));
      }
      if (*sel != "secret" && q != 1) {
        throw VerifyError("{}: accounts sample rate {} for a selection that was not secret ({}): only a secret one "
                          "amplifies privacy",
                          w, q, sel->get<std::string>());
      }
    }
    m_client.spent.add(q, z, 1);
    ++m_client.runs;
    if (verify) {
      verify_total(m_client, number(*c, "epsilon", w), delta, accountant, max_epsilon, w);
    }
  }
  if (const auto s = p.find("sites"); s != p.end()) {
    if (!s->is_object()) {
      throw VerifyError("{}.sites: not a JSON object", what);
    }
    for (const auto& [name, j] : s->items()) {
      const auto w = fmt::format("{}.sites.{}", what, name);
      const auto report = DpSgdReport::from_json(j, w, accountant);
      auto& site = m_sites[name];
      report.add_to(site.spent);
      ++site.runs;
      if (verify) {
        if (const double recorded = number(j, "epsilon", w); !same(recorded, report.epsilon)) {
          throw VerifyError("{}: records epsilon {} for the round but its parameters give {}", w, recorded,
                            report.epsilon);
        }
        verify_total(site, number(j, "total_epsilon", w), report.delta, accountant, std::nullopt, w + " total");
      }
    }
  }
}

json
FederationPrivacy::record_round(const std::optional<ClientDpRound>& client,
                                const std::map<std::string, DpSgdReport>& sites, std::optional<double> max_epsilon,
                                Accountant accountant)
{
  json p = json::object();
  if (client) {
    m_client.spent.add(client->sample_rate, client->noise_multiplier, 1);
    ++m_client.runs;
    const auto spent = m_client.spent.epsilon(client->delta, accountant);
    p["client"] = {{"clip_norm", client->clip_norm},     {"noise_multiplier", client->noise_multiplier},
                   {"sample_rate", client->sample_rate}, {"delta", client->delta},
                   {"epsilon", spent.epsilon},           {"selection", client->selection}};
    if (accountant != Accountant::pld_v1) {
      p["client"]["order"] = spent.order;
    }
  }
  if (max_epsilon) {
    p["max_epsilon"] = *max_epsilon;
  }
  if (!sites.empty()) {
    json s = json::object();
    for (const auto& [name, report] : sites) {
      auto& site = m_sites[name];
      report.add_to(site.spent);
      ++site.runs;
      auto j = report.to_json();
      j["epsilon"] = run_epsilon(report, accountant);
      j["total_epsilon"] = site.spent.epsilon(report.delta, accountant).epsilon;
      s[name] = std::move(j);
    }
    p["sites"] = std::move(s);
  }
  if (p.empty()) {
    return nullptr;
  }
  p["accountant"] = accountant_name(accountant);
  if (m_accountant && *m_accountant != accountant) {
    p["accountant_changed_from"] = accountant_name(*m_accountant);
  }
  m_accountant = accountant;
  return p;
}

json
FederationPrivacy::site_report(const std::string& name) const
{
  const auto it = m_sites.find(name);
  if (it == m_sites.end() || it->second.spent.empty()) {
    return nullptr;
  }
  return SiteSpending{it->second.spent, it->second.runs}.to_json();
}

json
SiteSpending::to_json() const
{
  auto j = spent.to_json();
  j["runs"] = runs;
  return j;
}

SiteSpending
SiteSpending::from_json(const json& j, const std::string& what)
{
  SiteSpending s;
  s.spent = PrivacyAccount::from_json(j, what);
  if (const auto it = j.find("runs"); it != j.end()) {
    if (!it->is_number_unsigned()) {
      throw Error("{}: \"runs\" is not a count of runs", what);
    }
    s.runs = it->get<std::uint64_t>();
  }
  return s;
}

void
check_not_weaker(const json& last_dp, const PrivacyConfig& now, std::uint64_t rounds)
{
  if (last_dp.is_null()) {
    return;
  }
  const auto& c = last_dp.at("client");
  const double noise = c.value("noise_multiplier", 0.0);
  const double clip = c.value("clip_norm", 0.0);
  const bool weaker =
    now.noise_multiplier < noise || now.clip_norm > clip ||
    (last_dp.contains("max_epsilon") && (now.max_epsilon <= 0 || now.max_epsilon > last_dp.value("max_epsilon", 0.0)));
  if (weaker) {
    throw UsageError("rounds up to {} ran with client-level DP (clip {:g}, noise multiplier {:g}{}); serve them on "
                     "with at least that (--dp-clip-norm, --dp-noise-multiplier{}), not clip {:g}, noise multiplier "
                     "{:g}{}",
                     rounds, clip, noise,
                     last_dp.contains("max_epsilon") ? fmt::format(", budget {:g}", last_dp.value("max_epsilon", 0.0))
                                                     : std::string(),
                     last_dp.contains("max_epsilon") ? ", --max-epsilon" : "", now.clip_norm, now.noise_multiplier,
                     now.max_epsilon > 0 ? fmt::format(", budget {:g}", now.max_epsilon) : std::string(", no budget"));
  }
}

std::optional<double>
round_client_epsilon(const json& body)
{
  const auto it = body.find("privacy");
  if (it == body.end() || !it->is_object()) {
    return std::nullopt;
  }
  const auto c = it->find("client");
  if (c == it->end() || !c->is_object() || !c->contains("epsilon") || !(*c)["epsilon"].is_number()) {
    return std::nullopt;
  }
  return (*c)["epsilon"].get<double>();
}

std::string
round_privacy_text(const json& body)
{
  const auto it = body.find("privacy");
  if (it == body.end() || !it->is_object()) {
    return {};
  }
  std::string t;
  if (const auto epsilon = round_client_epsilon(body)) {
    t += fmt::format(", epsilon {:.4g}", *epsilon);
    if (const auto m = it->find("max_epsilon"); m != it->end() && m->is_number()) {
      t += fmt::format(" of {:g}", m->get<double>());
    }
  }
  if (const auto s = it->find("sites"); s != it->end() && s->is_object() && !s->empty()) {
    double most = 0;
    for (const auto& [name, r] : s->items()) {
      most = std::max(most, r.value("total_epsilon", 0.0));
    }
    t += fmt::format(", site epsilon up to {:.4g}", most);
  }
  return t;
}

SiteAccount
SiteAccount::open(const fs::path& path, const Identity& identity)
{
  SiteAccount a(path, identity);
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return a;
  }
  // A last line without its newline is an append that a crash cut short. Runs are appended before
  // their update leaves, so that run was never sent: drop the fragment (a file that was only a
  // fragment had recorded nothing).
  if (const auto size = fs::file_size(path, ec); !ec && size > 0) {
    std::size_t keep = 0;
    std::size_t total = 0;
    {
      const MappedFile file(path);
      const auto bytes = file.bytes();
      total = bytes.size();
      keep = total;
      while (keep > 0 && bytes[keep - 1] != std::byte{'\n'}) {
        --keep;
      }
    }
    if (keep != total) {
      FEDL_LOG_WARN("{}: dropping an incomplete last line ({} bytes) that an interrupted write left", path.string(),
                    total - keep);
      if (keep == 0) {
        fs::remove(path, ec);
      } else {
        fs::resize_file(path, keep, ec);
      }
      if (ec) {
        throw Error("cannot repair {}: {}", path.string(), ec.message());
      }
      if (keep == 0) {
        return a;
      }
    }
  }
  a.m_existed = true;
  // `detail` names the file.
  const auto why = [&](const std::string& detail) {
    return VerifyError("{}; the site's privacy account was altered or damaged, so fedl cannot tell what this site "
                       "has spent: restore the file from a backup (fedl will not train with a budget until then)",
                       detail);
  };
  std::vector<LedgerEntry> entries;
  try {
    entries = read_ledger(path, [&identity](std::string_view payload, const std::string& sig) {
      return verify_signature(identity.cert, as_bytes(payload), sig);
    });
  } catch (const VerifyError& e) {
    throw why(e.what());
  }
  if (entries.empty()) {
    throw why(fmt::format("{} is empty", path.string()));
  }
  for (std::size_t i = 1; i < entries.size(); ++i) {
    const auto& e = entries[i];
    if (e.kind != "spent") {
      throw why(fmt::format("{}: line {} is a \"{}\" entry, not \"spent\"", path.string(), e.line, e.kind));
    }
    try {
      // Lines before December 2026 name no accountant; either way only the parameters count here.
      const auto name = e.body.value("accountant", std::string(accountant_name(Accountant::rdp_v1)));
      const auto accountant = accountant_from_name(name);
      if (!accountant) {
        throw VerifyError("{}: line {} records accountant \"{}\", which this fedl does not know", path.string(), e.line,
                          valid_utf8(name, 40));
      }
      DpSgdReport::from_json(e.body.value("report", json()), fmt::format("{}: line {}", path.string(), e.line),
                             *accountant)
        .add_to(a.m_spent);
    } catch (const Error& err) {
      throw why(err.what());
    }
    ++a.m_runs;
  }
  return a;
}

void
SiteAccount::append(const DpSgdReport& report, const json& context, Accountant accountant)
{
  const Signer signer = [this](std::string_view payload) { return sign(m_identity->key, as_bytes(payload)); };
  if (!m_existed) {
    const auto info = certificate_info(m_identity->cert);
    append_ledger(m_path, "genesis", {{"site", info.common_name}, {"certificate", info.fingerprint}}, signer);
    m_existed = true;
  }
  json body = context;
  body["report"] = report.to_json();
  PrivacyAccount next = m_spent;
  report.add_to(next);
  body["accountant"] = accountant_name(accountant);
  body["total_epsilon"] = next.epsilon(report.delta, accountant).epsilon;
  append_ledger(m_path, "spent", body, signer);
  m_spent = std::move(next);
  ++m_runs;
}

} // namespace fedl::core
