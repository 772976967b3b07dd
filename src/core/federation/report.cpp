// SPDX-License-Identifier: Apache-2.0
#include "core/federation/report.hpp"

#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace fedl::core {

namespace {

using json = nlohmann::json;

// Text for HTML, from a ledger (any bytes): valid UTF-8, bounded, the five special characters
// escaped.
std::string
html(std::string_view s, std::size_t max_bytes = 200)
{
  const auto text = valid_utf8(s, max_bytes);
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
    case '&':
      out += "&amp;";
      break;
    case '<':
      out += "&lt;";
      break;
    case '>':
      out += "&gt;";
      break;
    case '"':
      out += "&quot;";
      break;
    case '\'':
      out += "&#39;";
      break;
    default:
      out += c;
    }
  }
  return out;
}

std::optional<double>
number(const json& j, const char* key)
{
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number()) {
    return std::nullopt;
  }
  const double v = it->get<double>();
  return std::isfinite(v) ? std::optional<double>(v) : std::nullopt;
}

std::size_t
size_of(const json& j, const char* key)
{
  const auto it = j.find(key);
  return it != j.end() && it->is_array() ? it->size() : 0;
}

std::string
percent(double v)
{
  return fmt::format("{:.2f}%", v * 100);
}

std::string
plain(double v)
{
  return fmt::format("{:.4g}", v);
}

// An axis tick: a round number, without the digits a value shows.
std::string
tick(double v)
{
  return fmt::format("{:g}", std::abs(v) < 1e-12 ? 0.0 : v);
}

std::string
tick_percent(double v)
{
  return tick(std::round(v * 1e6) / 1e4) + "%";
}

// How a chart writes its values (in hover titles) and its axis ticks.
struct Format
{
  std::function<std::string(double)> value;
  std::function<std::string(double)> tick;
};
const Format as_percent{percent, tick_percent};
const Format as_plain{plain, tick};
const Format as_count{tick, tick};
const Format as_seconds{[](double v) { return fmt::format("{:.2f} s", v); }, tick};

// Colours of the series, in turn (the widely used "category10" set, and three more).
constexpr std::array<const char*, 13> palette = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
                                                 "#393b79", "#637939", "#8c6d31"};

// The frame of every chart: a 760 x 280 view box, the plot in the middle, the legend on the right.
constexpr double width = 760, height = 280, left = 64, right = 170, top = 16, bottom = 40;
constexpr double plot_w = width - left - right, plot_h = height - top - bottom;

// A value axis: about five ticks at 1, 2 or 5 times a power of ten, covering [lo, hi].
struct Axis
{
  double lo = 0, hi = 1;
  std::vector<double> ticks;

  Axis(double min, double max)
  {
    if (!(max > min)) {
      const double pad = min == 0 ? 1 : std::abs(min) * 0.1;
      min -= pad;
      max += pad;
    }
    const double raw = (max - min) / 5;
    const double mag = std::pow(10, std::floor(std::log10(raw)));
    const double r = raw / mag;
    const double step = mag * (r <= 1 ? 1 : r <= 2 ? 2 : r <= 5 ? 5 : 10);
    lo = std::floor(min / step) * step;
    hi = std::ceil(max / step) * step;
    for (int k = 0; lo + k * step <= hi + step / 2; ++k) {
      ticks.push_back(lo + k * step);
    }
  }
  double y(double v) const { return top + plot_h - (v - lo) / (hi - lo) * plot_h; }
};

// The rounds along the x axis: point charts place round r at x(r); bar charts give each round a slot.
struct Rounds
{
  std::vector<std::uint64_t> all;

  double x(std::uint64_t r) const
  {
    if (all.size() < 2) {
      return left + plot_w / 2;
    }
    return left + static_cast<double>(r - all.front()) / static_cast<double>(all.back() - all.front()) * plot_w;
  }
  double slot() const { return plot_w / static_cast<double>(std::max<std::size_t>(all.size(), 1)); }
  // At most about ten labelled rounds, at a step of 1, 2 or 5 times a power of ten.
  std::vector<std::uint64_t> labels() const
  {
    std::vector<std::uint64_t> out;
    if (all.empty()) {
      return out;
    }
    std::uint64_t step = 1;
    for (std::uint64_t mag = 1;; mag *= 10) {
      const auto fits = [&](std::uint64_t s) { return (all.back() - all.front()) / s < 10; };
      if (fits(mag) || fits(2 * mag) || fits(5 * mag)) {
        step = fits(mag) ? mag : fits(2 * mag) ? 2 * mag : 5 * mag;
        break;
      }
    }
    for (const auto r : all) {
      if (r % step == 0 || all.size() == 1) {
        out.push_back(r);
      }
    }
    return out;
  }
};

std::string
svg_open(const std::string& id, const std::string& label)
{
  return fmt::format(R"(<svg class="chart" id="{}" viewBox="0 0 {} {}" role="img" aria-label="{}">)"
                     "\n",
                     id, width, height, html(label));
}

// Grid lines and labels of the value axis, the round labels, the axis titles.
std::string
axes(const Axis& axis, const Format& format, const std::string& y_title,
     const std::vector<std::pair<double, std::uint64_t>>& x_labels)
{
  std::string s;
  for (const double t : axis.ticks) {
    const double y = axis.y(t);
    s += fmt::format(R"(<line class="grid" x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}"/>)"
                     R"(<text class="tick" x="{}" y="{:.1f}" text-anchor="end">{}</text>)"
                     "\n",
                     left, left + plot_w, y, y, left - 6, y + 4, html(format.tick(t)));
  }
  for (const auto& [x, r] : x_labels) {
    s += fmt::format(R"(<text class="tick" x="{:.1f}" y="{}" text-anchor="middle">{}</text>)", x, top + plot_h + 16, r);
  }
  s += fmt::format(R"(<text class="axis" x="{}" y="{}" text-anchor="middle">round</text>)"
                   R"~(<text class="axis" x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>)~"
                   "\n",
                   left + plot_w / 2, height - 6, top + plot_h / 2, top + plot_h / 2, html(y_title));
  return s;
}

std::string
legend_entry(std::size_t k, const std::string& name, const char* colour)
{
  const double y = top + 10 + static_cast<double>(k) * 18;
  return fmt::format(R"(<g class="legend"><rect x="{}" y="{:.1f}" width="12" height="12" fill="{}"/>)"
                     R"(<text x="{}" y="{:.1f}">{}</text></g>)"
                     "\n",
                     left + plot_w + 14, y - 10, colour, left + plot_w + 32, y, html(name, 40));
}

// Where a chart would be: what no round recorded.
std::string
empty_chart(const std::string& id, const char* what)
{
  return fmt::format(R"(<p class="empty" id="{}">No round recorded {}.</p>)"
                     "\n",
                     id, what);
}

struct Series
{
  std::string name;
  std::vector<std::pair<std::uint64_t, double>> points; // (round, value)
};

// Lines with a point per value; `what` names the chart when there is nothing to draw.
std::string
line_chart(const std::string& id, const std::string& label, const std::string& y_title, const Rounds& rounds,
           const std::vector<Series>& series, const Format& format, const char* what)
{
  double min = INFINITY, max = -INFINITY;
  std::size_t points = 0;
  for (const auto& s : series) {
    for (const auto& [r, v] : s.points) {
      min = std::min(min, v);
      max = std::max(max, v);
      ++points;
    }
  }
  if (points == 0) {
    return empty_chart(id, what);
  }
  const Axis axis(min, max);
  std::vector<std::pair<double, std::uint64_t>> labels;
  for (const auto r : rounds.labels()) {
    labels.emplace_back(rounds.x(r), r);
  }
  std::string s = svg_open(id, label) + axes(axis, format, y_title, labels);
  const double radius = points > 300 ? 1.5 : 3;
  for (std::size_t k = 0; k < series.size(); ++k) {
    const auto* colour = palette.at(k % palette.size());
    const auto name = html(series[k].name, 40);
    std::string line;
    for (const auto& [r, v] : series[k].points) {
      line += fmt::format("{:.1f},{:.1f} ", rounds.x(r), axis.y(v));
    }
    s += fmt::format(R"(<polyline class="series" data-series="{}" fill="none" stroke="{}" points="{}"/>)"
                     "\n",
                     name, colour, line);
    for (const auto& [r, v] : series[k].points) {
      s += fmt::format(R"(<circle class="point" data-series="{}" data-round="{}" cx="{:.1f}" cy="{:.1f}" r="{}" )"
                       R"(fill="{}"><title>{}, round {}: {}</title></circle>)"
                       "\n",
                       name, r, rounds.x(r), axis.y(v), radius, colour, name, r, html(format.value(v)));
    }
    s += legend_entry(k, series[k].name, colour);
  }
  return s + "</svg>\n";
}

// Bars stacked per round, one segment per series (none where its value is 0); `notes` are the
// rounds' hover texts.
std::string
bar_chart(const std::string& id, const std::string& label, const std::string& y_title, const Rounds& rounds,
          const std::vector<Series>& series, const std::map<std::uint64_t, std::string>& notes, const Format& format,
          const char* what)
{
  std::map<std::uint64_t, double> totals;
  for (const auto& s : series) {
    for (const auto& [r, v] : s.points) {
      totals[r] += v;
    }
  }
  if (totals.empty()) {
    return empty_chart(id, what);
  }
  double max = 0;
  for (const auto& [r, t] : totals) {
    max = std::max(max, t);
  }
  const Axis axis(0, max);
  const double slot = rounds.slot();
  std::map<std::uint64_t, std::size_t> index;
  for (std::size_t i = 0; i < rounds.all.size(); ++i) {
    index[rounds.all[i]] = i;
  }
  const auto slot_x = [&](std::uint64_t r) { return left + static_cast<double>(index.at(r)) * slot; };
  std::vector<std::pair<double, std::uint64_t>> labels;
  for (const auto r : rounds.labels()) {
    labels.emplace_back(slot_x(r) + slot / 2, r);
  }
  std::string s = svg_open(id, label) + axes(axis, format, y_title, labels);
  std::map<std::uint64_t, double> base;
  for (std::size_t k = 0; k < series.size(); ++k) {
    const auto* colour = palette.at(k % palette.size());
    const auto name = html(series[k].name, 40);
    for (const auto& [r, v] : series[k].points) {
      if (v <= 0 || index.count(r) == 0) {
        continue;
      }
      const double y0 = axis.y(base[r]);
      const double y1 = axis.y(base[r] + v);
      base[r] += v;
      const auto note = notes.find(r);
      s += fmt::format(R"(<rect class="bar" data-series="{}" data-round="{}" x="{:.1f}" y="{:.1f}" width="{:.1f}" )"
                       R"(height="{:.1f}" fill="{}"><title>round {}: {}</title></rect>)"
                       "\n",
                       name, r, slot_x(r) + slot * 0.15, y1, slot * 0.7, std::max(0.0, y0 - y1), colour, r,
                       note != notes.end() ? html(note->second) : html(format.value(v)));
    }
    s += legend_entry(k, series[k].name, colour);
  }
  return s + "</svg>\n";
}

constexpr const char* style = R"(
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 2em auto; max-width: 980px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.verified { padding: 0.6em 0.9em; border-radius: 4px; }
.verified.ok { background: #e8f5e9; border: 1px solid #81c784; }
.verified.failed { background: #ffebee; border: 1px solid #e57373; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; white-space: nowrap; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
table.summary td:first-child { color: #555; }
svg.chart { width: 100%; height: auto; max-width: 760px; display: block; }
svg .grid { stroke: #e4e4e4; } svg .tick { font-size: 11px; fill: #666; } svg .axis { font-size: 12px; fill: #444; }
svg .legend text { font-size: 12px; } svg polyline { stroke-width: 1.8; }
.empty, .note { color: #666; } code { font-size: 0.95em; }
)";

// 2026-12-06T06:09:02.259Z as 2026-12-06 06:09:02.
std::string
short_time(std::string t)
{
  if (t.size() >= 19 && t[10] == 'T') {
    t[10] = ' ';
    t.resize(19);
  }
  return t;
}

std::string
round_cell(const std::optional<double>& v, const std::function<std::string(double)>& format)
{
  return v ? html(format(*v)) : std::string("&ndash;");
}

// Every figure of the rounds, as the charts draw them.
struct History
{
  Rounds rounds;
  Series accuracy{"accuracy", {}}, loss{"loss", {}}, client{"client-level", {}}, seconds{"seconds", {}};
  // The sites' own evaluations (join --eval-data), at the round whose model they evaluated.
  Series site_accuracy{"at the sites", {}}, site_loss{"at the sites", {}};
  Series updates{"updates", {}}, rejected{"rejected", {}}, dropped{"dropped", {}}, late{"late", {}};
  std::map<std::string, Series> sites; // each site's epsilon
  std::map<std::uint64_t, std::string> participation_notes;
  std::optional<std::pair<double, std::uint64_t>> best; // accuracy, round
};

void
add_row(History& h, const json& row)
{
  const auto r = row.at("round").get<std::uint64_t>();
  h.rounds.all.push_back(r);
  if (const auto v = number(row, "accuracy")) {
    h.accuracy.points.emplace_back(r, *v);
    if (!h.best || *v > h.best->first) {
      h.best = {*v, r};
    }
  }
  if (const auto v = number(row, "loss")) {
    h.loss.points.emplace_back(r, *v);
  }
  if (const auto f = row.find("federated_evaluation"); f != row.end() && f->is_object()) {
    const auto model_round = number(*f, "model_round");
    if (model_round && *model_round >= 1) {
      const auto at = static_cast<std::uint64_t>(*model_round);
      if (const auto v = number(*f, "accuracy")) {
        h.site_accuracy.points.emplace_back(at, *v);
      }
      if (const auto v = number(*f, "loss")) {
        h.site_loss.points.emplace_back(at, *v);
      }
    }
  }
  if (const auto v = number(row, "epsilon")) {
    h.client.points.emplace_back(r, *v);
  }
  if (const auto v = number(row, "seconds")) {
    h.seconds.points.emplace_back(r, *v);
  }
  if (row.contains("site_epsilon") && row["site_epsilon"].is_object()) {
    for (const auto& [site, e] : row["site_epsilon"].items()) {
      if (e.is_number()) {
        auto& s = h.sites[site];
        s.name = site;
        s.points.emplace_back(r, e.get<double>());
      }
    }
  }
  const auto n = [&](const char* key) { return static_cast<double>(size_of(row, key)); };
  h.updates.points.emplace_back(r, n("participants"));
  h.rejected.points.emplace_back(r, n("rejected"));
  h.dropped.points.emplace_back(r, n("dropped"));
  h.late.points.emplace_back(r, n("late"));
  const auto asked = number(row, "asked");
  h.participation_notes[r] =
    fmt::format("{} updates, {} rejected, {} dropped, {} late{}", n("participants"), n("rejected"), n("dropped"),
                n("late"), asked ? fmt::format(" ({} asked)", *asked) : std::string());
}

std::string
summary_html(const json& a, const History& h)
{
  const auto& rows = a.at("rounds");
  const auto latest = rows.empty() ? json::object() : rows.back();
  std::string page = "<table class=\"summary\" id=\"summary\">\n";
  const auto line = [&page](const std::string& k, const std::string& v) {
    page += fmt::format("<tr><td>{}</td><td>{}</td></tr>\n", k, v);
  };
  line("rounds", fmt::format("{}", rows.size()));
  line("latest model", fmt::format("<code>{}</code>", html(a.value("latest_model", ""))));
  line("latest accuracy", round_cell(number(latest, "accuracy"), percent));
  if (h.best) {
    line("best accuracy", fmt::format("{} (round {})", html(percent(h.best->first)), h.best->second));
  }
  if (const auto b = a.find("best"); b != a.end() && b->is_object()) {
    line("best model",
         fmt::format("round {} by {} {} (<code>{}</code>)", b->value("round", 0), html(b->value("metric", "")),
                     html(plain(b->value("value", 0.0))),
                     html((*b)["file"].is_string() ? (*b)["file"].get<std::string>() : b->value("model", ""))));
  }
  if (a.contains("privacy") && a["privacy"].contains("client")) {
    const auto& c = a["privacy"]["client"];
    line("client-level epsilon",
         fmt::format("{} at delta {} ({})", html(plain(c.value("epsilon", 0.0))),
                     html(fmt::format("{:g}", c.value("delta", 0.0))), html(c.value("accountant", ""))));
  }
  const Series* most = nullptr;
  for (const auto& [name, s] : h.sites) {
    if (!s.points.empty() && (most == nullptr || s.points.back().second > most->points.back().second)) {
      most = &s;
    }
  }
  if (most != nullptr) {
    line("largest site epsilon", fmt::format("{} ({})", html(plain(most->points.back().second)), html(most->name)));
  }
  line("rejected updates", fmt::format("{}", a.value("rejected_updates", 0)));
  return page + "</table>\n";
}

std::string
charts_html(History h)
{
  const auto with_sites = [](Series coordinator, Series at_sites) {
    std::vector<Series> out{std::move(coordinator)};
    if (!at_sites.points.empty()) {
      out.push_back(std::move(at_sites));
    }
    return out;
  };
  std::string page = "<h2>Accuracy and loss of the global model</h2>\n";
  page += line_chart("chart-accuracy", "test accuracy per round", "accuracy", h.rounds,
                     with_sites(h.accuracy, h.site_accuracy), as_percent, "an accuracy (no evaluation data)");
  page += line_chart("chart-loss", "test loss per round", "loss", h.rounds, with_sites(h.loss, h.site_loss), as_plain,
                     "a loss");
  page += "<h2>Privacy: epsilon spent after each round</h2>\n";
  std::vector<Series> privacy;
  if (!h.client.points.empty()) {
    privacy.push_back(h.client);
  }
  std::vector<Series> by_spent;
  for (auto& [name, s] : h.sites) {
    by_spent.push_back(std::move(s));
  }
  std::stable_sort(by_spent.begin(), by_spent.end(),
                   [](const Series& x, const Series& y) { return x.points.back().second > y.points.back().second; });
  if (by_spent.size() > report_max_site_series) {
    page += fmt::format("<p class=\"note\">The {} sites that spent the most of {}.</p>\n", report_max_site_series,
                        by_spent.size());
    by_spent.resize(report_max_site_series);
  }
  privacy.insert(privacy.end(), by_spent.begin(), by_spent.end());
  page += line_chart("chart-epsilon", "epsilon per round", "epsilon", h.rounds, privacy, as_plain,
                     "an epsilon (no differential privacy)");
  page += "<h2>Participation</h2>\n";
  page += bar_chart("chart-participation", "updates, rejected, dropped and late per round", "sites", h.rounds,
                    {h.updates, h.rejected, h.dropped, h.late}, h.participation_notes, as_count, "a participant");
  page += "<h2>Round durations</h2>\n";
  page += bar_chart("chart-seconds", "seconds per round, from tasks sent to ledger entry", "seconds", h.rounds,
                    {h.seconds}, {}, as_seconds, "its duration (rounds written by fedl aggregate have none)");
  return page;
}

std::string
rounds_html(const json& rows)
{
  std::string page = "<h2>Rounds</h2>\n<table id=\"rounds\">\n<tr><th>round</th><th>time (UTC)</th><th>strategy</th>"
                     "<th>updates</th><th>rejected</th><th>dropped</th><th>late</th><th>accuracy</th><th>loss</th>"
                     "<th>epsilon</th><th>seconds</th></tr>\n";
  for (const auto& row : rows) {
    page += fmt::format("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                        "<td>{}</td><td>{}</td><td>{}</td></tr>\n",
                        row.at("round").get<std::uint64_t>(), html(short_time(row.value("time", ""))),
                        html(row.value("strategy", "")), size_of(row, "participants"), size_of(row, "rejected"),
                        size_of(row, "dropped"), size_of(row, "late"), round_cell(number(row, "accuracy"), percent),
                        round_cell(number(row, "loss"), plain), round_cell(number(row, "epsilon"), plain),
                        round_cell(number(row, "seconds"), [](double v) { return fmt::format("{:.2f}", v); }));
  }
  return page + "</table>\n";
}

} // namespace

std::string
report_html(const ReportInput& in)
{
  std::string page = fmt::format(
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
    "<meta name=\"generator\" content=\"fedl {}\">\n<title>fedl report: "
    "{}</title>\n<style>{}</style>\n</head>\n<body>\n"
    "<h1>Federation report: {}</h1>\n<p class=\"note\">Written by fedl {} at {} from the workspace's ledger.</p>\n",
    html(in.version), html(in.workspace), style, html(in.workspace), html(in.version), html(in.generated));
  if (in.audit.is_null()) {
    page += fmt::format("<p class=\"verified failed\" id=\"verification\"><strong>The ledger does not verify</strong>: "
                        "{}.<br>Nothing of it is shown: run <code>fedl audit {}</code> for the details.</p>\n",
                        html(in.failure, 2000), html(in.workspace));
    return page + "</body>\n</html>\n";
  }
  const auto& a = in.audit;
  page += fmt::format("<p class=\"verified ok\" id=\"verification\"><strong>Verified</strong> by <code>fedl "
                      "audit</code>: {} ledger entries, their hash chain and signatures, the certificates, "
                      "<code>fedl.json</code> and every model file; every recorded epsilon recomputed. "
                      "CA fingerprint <code>{}</code>.</p>\n",
                      a.value("entries", 0), html(a.value("ca_fingerprint", "")));
  History h;
  for (const auto& row : a.at("rounds")) {
    add_row(h, row);
  }
  page += summary_html(a, h);
  page += charts_html(std::move(h));
  page += rounds_html(a.at("rounds"));
  return page + "</body>\n</html>\n";
}

} // namespace fedl::core
