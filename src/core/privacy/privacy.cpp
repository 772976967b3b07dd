// SPDX-License-Identifier: Apache-2.0
#include "core/privacy/privacy.hpp"

#include "core/trust/ledger.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <utility>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using nlohmann::json;

// One step's RDP curve for (q, σ): the fractional orders take a quadrature each, and a
// federation's replay asks for the same (q, σ) round after round.
std::vector<double>
step_curve(double q, double sigma)
{
  static std::mutex mutex;
  static std::map<std::pair<double, double>, std::vector<double>> cache;
  {
    const std::lock_guard lock(mutex);
    if (const auto it = cache.find({q, sigma}); it != cache.end()) {
      return it->second;
    }
  }
  std::vector<double> curve;
  for (const double a : default_orders()) {
    curve.push_back(rdp_sampled_gaussian(q, sigma, a));
  }
  const std::lock_guard lock(mutex);
  if (cache.size() > 4096) {
    cache.clear();
  }
  cache.emplace(std::make_pair(q, sigma), curve);
  return curve;
}

// A run's epsilon alone, through the cached step curve (an audit recomputes one per site and
// round; compute_epsilon would integrate the fractional orders again every time).
double
run_epsilon(const DpSgdReport& r)
{
  RdpAccount a;
  r.add_to(a);
  return a.epsilon(r.delta).epsilon;
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

RdpAccount::RdpAccount() : m_rdp(default_orders().size(), 0.0) {}

void
RdpAccount::add(double q, double sigma, std::uint64_t steps)
{
  if (steps == 0) {
    return;
  }
  const auto curve = step_curve(q, sigma);
  for (std::size_t i = 0; i < m_rdp.size(); ++i) {
    m_rdp[i] += static_cast<double>(steps) * curve[i]; // RDP composes by addition
  }
  m_any = true;
}

void
RdpAccount::merge_max(const RdpAccount& other)
{
  for (std::size_t i = 0; i < m_rdp.size(); ++i) {
    m_rdp[i] = std::max(m_rdp[i], other.m_rdp[i]);
  }
  m_any = m_any || other.m_any;
}

PrivacySpent
RdpAccount::epsilon(double delta) const
{
  if (!m_any) {
    return {};
  }
  return epsilon_from_rdp(default_orders(), m_rdp, delta);
}

json
RdpAccount::to_json() const
{
  return {{"orders", std::vector<double>(default_orders().begin(), default_orders().end())}, {"rdp", m_rdp}};
}

RdpAccount
RdpAccount::from_json(const json& j, const std::string& what)
{
  const auto orders = default_orders();
  if (!j.is_object() || !j.contains("orders") || !j.contains("rdp") || !j["orders"].is_array() ||
      !j["rdp"].is_array() || j["orders"].size() != orders.size() || j["rdp"].size() != orders.size()) {
    throw Error("{}: not an RDP account ({{\"orders\": [...], \"rdp\": [...]}} with {} orders)", what, orders.size());
  }
  RdpAccount a;
  for (std::size_t i = 0; i < orders.size(); ++i) {
    const auto& o = j["orders"][i];
    const auto& r = j["rdp"][i];
    if (!o.is_number() || o.get<double>() != orders[i]) {
      throw Error("{}: order {} is not {}, the order this fedl accounts at", what, brief(o), orders[i]);
    }
    if (!r.is_number() || !(r.get<double>() >= 0) || !std::isfinite(r.get<double>())) {
      throw Error("{}: RDP value {} is not a finite non-negative number", what, brief(r));
    }
    a.m_rdp[i] = r.get<double>();
    a.m_any = a.m_any || a.m_rdp[i] > 0;
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
DpSgdReport::from_json(const json& j, const std::string& what)
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
  r.epsilon = run_epsilon(r);
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
  r.epsilon = run_epsilon(r);
  return r;
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
  if (const auto c = p.find("client"); c != p.end()) {
    const auto w = what + ".client";
    const double q = number(*c, "sample_rate", w);
    const double z = number(*c, "noise_multiplier", w);
    const double delta = number(*c, "delta", w);
    if (!(q > 0 && q <= 1) || !(z > 0) || !(delta > 0 && delta < 1) || !(number(*c, "clip_norm", w) > 0)) {
      throw VerifyError("{}: parameters out of range: {}", w, brief(*c));
    }
    m_client.add(q, z, 1);
    ++m_client_rounds;
    if (verify) {
      const auto e = m_client.epsilon(delta).epsilon;
      if (const double recorded = number(*c, "epsilon", w); !same(recorded, e)) {
        throw VerifyError("{}: records epsilon {} but its parameters and the rounds before give {}", w, recorded, e);
      }
      if (const auto m = p.find("max_epsilon"); m != p.end() && m->is_number() && e > m->get<double>() * (1 + 1e-9)) {
        throw VerifyError("{}: epsilon {} is past the budget of {} that the round records", w, e, m->get<double>());
      }
    }
  }
  if (const auto s = p.find("sites"); s != p.end()) {
    if (!s->is_object()) {
      throw VerifyError("{}.sites: not a JSON object", what);
    }
    for (const auto& [name, j] : s->items()) {
      const auto w = fmt::format("{}.sites.{}", what, name);
      const auto report = DpSgdReport::from_json(j, w);
      auto& site = m_sites[name];
      report.add_to(site.rdp);
      ++site.runs;
      if (verify) {
        if (const double recorded = number(j, "epsilon", w); !same(recorded, report.epsilon)) {
          throw VerifyError("{}: records epsilon {} for the round but its parameters give {}", w, recorded,
                            report.epsilon);
        }
        const auto total = site.rdp.epsilon(report.delta).epsilon;
        if (const double recorded = number(j, "total_epsilon", w); !same(recorded, total)) {
          throw VerifyError("{}: records a total epsilon of {} but its rounds give {}", w, recorded, total);
        }
      }
    }
  }
}

json
FederationPrivacy::record_round(const std::optional<ClientDpRound>& client,
                                const std::map<std::string, DpSgdReport>& sites, std::optional<double> max_epsilon)
{
  json p = json::object();
  if (client) {
    m_client.add(client->sample_rate, client->noise_multiplier, 1);
    ++m_client_rounds;
    const auto spent = m_client.epsilon(client->delta);
    p["client"] = {{"clip_norm", client->clip_norm},     {"noise_multiplier", client->noise_multiplier},
                   {"sample_rate", client->sample_rate}, {"delta", client->delta},
                   {"epsilon", spent.epsilon},           {"order", spent.order}};
  }
  if (max_epsilon) {
    p["max_epsilon"] = *max_epsilon;
  }
  if (!sites.empty()) {
    json s = json::object();
    for (const auto& [name, report] : sites) {
      auto& site = m_sites[name];
      report.add_to(site.rdp);
      ++site.runs;
      auto j = report.to_json();
      j["total_epsilon"] = site.rdp.epsilon(report.delta).epsilon;
      s[name] = std::move(j);
    }
    p["sites"] = std::move(s);
  }
  return p.empty() ? json(nullptr) : p;
}

json
FederationPrivacy::site_report(const std::string& name) const
{
  const auto it = m_sites.find(name);
  if (it == m_sites.end() || it->second.rdp.empty()) {
    return nullptr;
  }
  return SiteSpending{it->second.rdp, it->second.runs}.to_json();
}

json
SiteSpending::to_json() const
{
  auto j = rdp.to_json();
  j["runs"] = runs;
  return j;
}

SiteSpending
SiteSpending::from_json(const json& j, const std::string& what)
{
  SiteSpending s;
  s.rdp = RdpAccount::from_json(j, what);
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

std::string
round_privacy_text(const json& body)
{
  const auto it = body.find("privacy");
  if (it == body.end() || !it->is_object()) {
    return {};
  }
  std::string t;
  if (const auto c = it->find("client"); c != it->end() && c->is_object()) {
    t += fmt::format(", epsilon {:.4g}", c->value("epsilon", 0.0));
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
      DpSgdReport::from_json(e.body.value("report", json()), fmt::format("{}: line {}", path.string(), e.line))
        .add_to(a.m_spent);
    } catch (const Error& err) {
      throw why(err.what());
    }
    ++a.m_runs;
  }
  return a;
}

void
SiteAccount::append(const DpSgdReport& report, const json& context)
{
  const Signer signer = [this](std::string_view payload) { return sign(m_identity->key, as_bytes(payload)); };
  if (!m_existed) {
    const auto info = certificate_info(m_identity->cert);
    append_ledger(m_path, "genesis", {{"site", info.common_name}, {"certificate", info.fingerprint}}, signer);
    m_existed = true;
  }
  json body = context;
  body["report"] = report.to_json();
  RdpAccount next = m_spent;
  report.add_to(next);
  body["total_epsilon"] = next.epsilon(report.delta).epsilon;
  append_ledger(m_path, "spent", body, signer);
  m_spent = std::move(next);
  ++m_runs;
}

} // namespace fedl::core
