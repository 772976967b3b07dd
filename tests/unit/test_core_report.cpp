// SPDX-License-Identifier: Apache-2.0
// fedl report's page from an audit result: the text of a ledger escaped, a point per value, no
// NaN for a single round or flat figures, and a page without figures for a ledger that failed.
#include "core/federation/report.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace fedl::core;
using json = nlohmann::json;

namespace {

std::size_t
occurrences(const std::string& text, const std::string& what)
{
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

json
audit_of(std::size_t rounds, double accuracy_step)
{
  json rows = json::array();
  for (std::size_t r = 1; r <= rounds; ++r) {
    rows.push_back({{"round", r},
                    {"strategy", "fedavg"},
                    {"participants", {"a", "b"}},
                    {"rejected", json::array()},
                    {"dropped", json::array()},
                    {"late", json::array()},
                    {"accuracy", 0.5 + accuracy_step * static_cast<double>(r)},
                    {"loss", 1.0},
                    {"epsilon", nullptr},
                    {"site_epsilon", json::object()},
                    {"seconds", 2.0},
                    {"time", "2026-12-06T06:09:02.259Z"}});
  }
  return {{"entries", rounds + 2},
          {"rounds", rows},
          {"latest_model", "models/global-000001.safetensors"},
          {"ca_fingerprint", "ab"},
          {"rejected_updates", 0}};
}

} // namespace

TEST_CASE("report: a ledger's text is escaped, never markup")
{
  auto audit = audit_of(2, 0.1);
  audit["rounds"][0]["strategy"] = "<script>alert(1)</script>";
  audit["rounds"][1]["site_epsilon"] = {{"<img src=x onerror=alert(1)>", 1.5}, {"b\"'&", 2.0}};
  const auto page = report_html({"w<s>", audit, "", "2026-12-06T00:00:00Z", "0.1"});
  CHECK(page.find("<script") == std::string::npos);
  CHECK(page.find("<img") == std::string::npos);
  CHECK(page.find("&lt;script&gt;alert(1)&lt;/script&gt;") != std::string::npos);
  CHECK(page.find("w&lt;s&gt;") != std::string::npos);
  CHECK(page.find("b&quot;&#39;&amp;") != std::string::npos);
  CHECK(page.find("http:") == std::string::npos); // nothing fetched
  // One epsilon point per site (round 2 only), no client-level series.
  CHECK(occurrences(page, "class=\"point\" data-series=\"b&quot;&#39;&amp;\"") == 1);
  CHECK(occurrences(page, "data-series=\"client-level\"") == 0);
}

TEST_CASE("report: a point per value and a bar per round; one round and flat figures draw without NaN")
{
  const auto page = report_html({"ws", audit_of(7, 0.01), "", "t", "v"});
  CHECK(occurrences(page, "class=\"point\" data-series=\"accuracy\"") == 7);
  CHECK(occurrences(page, "class=\"point\" data-series=\"loss\"") == 7);
  CHECK(occurrences(page, "class=\"bar\" data-series=\"updates\"") == 7);
  CHECK(occurrences(page, "class=\"bar\" data-series=\"seconds\"") == 7);
  CHECK(occurrences(page, "class=\"bar\" data-series=\"dropped\"") == 0);
  CHECK(page.find("id=\"chart-epsilon\">No round recorded an epsilon") != std::string::npos);
  const auto one = report_html({"ws", audit_of(1, 0), "", "t", "v"});
  CHECK(occurrences(one, "class=\"point\" data-series=\"loss\"") == 1);
  for (const char* bad : {"nan", "inf"}) {
    CHECK(page.find(bad) == std::string::npos);
    CHECK(one.find(bad) == std::string::npos);
  }
}

TEST_CASE("report: a ledger that failed its audit gets the failure and no figures")
{
  const auto page = report_html({"ws", nullptr, "ledger.jsonl: line 3: bad <signature>", "t", "v"});
  CHECK(page.find("The ledger does not verify") != std::string::npos);
  CHECK(page.find("bad &lt;signature&gt;") != std::string::npos);
  CHECK(page.find("<svg") == std::string::npos);
}
