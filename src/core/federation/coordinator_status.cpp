// SPDX-License-Identifier: Apache-2.0
// What the coordinator shows while it runs (coordinator_detail.hpp): the Prometheus metrics
// (--metrics) and the status file that `fedl status` reads (core/federation/status.hpp).
#include "core/federation/coordinator_detail.hpp"
#include "core/federation/status.hpp"
#include "core/util/clock.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>

#include <unistd.h>

namespace fedl::core::serve_detail {

std::string
Coordinator::metrics_text() const
{
  const auto in = m_pool->bytes_in();
  const auto out = m_pool->bytes_out();
  const auto& st = m_rounds.stats();
  std::string t;
  const auto metric = [&](const char* name, const char* type, const char* help, const std::string& samples) {
    t += fmt::format("# HELP {} {}\n# TYPE {} {}\n{}", name, help, name, type, samples);
  };
  metric("fedl_round", "gauge", "The round being run (or next to run).",
         fmt::format("fedl_round {}\n", m_rounds.round()));
  metric("fedl_rounds_completed_total", "counter", "Rounds completed by this coordinator process.",
         fmt::format("fedl_rounds_completed_total {}\n", st.rounds_done));
  metric("fedl_rounds_retried_total", "counter", "Round attempts that missed the quorum and were run again.",
         fmt::format("fedl_rounds_retried_total {}\n", st.retries));
  metric("fedl_connected_sites", "gauge", "Sites connected and admitted.",
         fmt::format("fedl_connected_sites {}\n", m_sites.size()));
  metric("fedl_round_duration_seconds", "summary", "Duration of completed rounds, from tasks sent to ledger entry.",
         fmt::format("fedl_round_duration_seconds_sum {}\nfedl_round_duration_seconds_count {}\n", st.round_seconds_sum,
                     st.rounds_done));
  metric("fedl_last_round_duration_seconds", "gauge", "Duration of the last completed round.",
         fmt::format("fedl_last_round_duration_seconds {}\n", st.last_round_seconds));
  metric("fedl_received_bytes_total", "counter", "Bytes received from sites (TLS payload).",
         fmt::format("fedl_received_bytes_total {}\n", in));
  metric("fedl_sent_bytes_total", "counter", "Bytes sent to sites (TLS payload).",
         fmt::format("fedl_sent_bytes_total {}\n", out));
  metric("fedl_updates_accepted_total", "counter", "Updates aggregated.",
         fmt::format("fedl_updates_accepted_total {}\n", st.updates_accepted));
  std::string rejected;
  for (const char* reason : {"invalid", "late", "unexpected"}) {
    const auto it = st.rejected.find(reason);
    rejected += fmt::format("fedl_updates_rejected_total{{reason=\"{}\"}} {}\n", reason,
                            it == st.rejected.end() ? 0 : it->second);
  }
  metric("fedl_updates_rejected_total", "counter", "Updates left out, by reason.", rejected);
  metric("fedl_connections_refused_total", "counter", "Connections refused at the TLS handshake or at hello.",
         fmt::format("fedl_connections_refused_total {}\n", m_pool->refused()));
  if (st.accuracy) {
    metric("fedl_accuracy", "gauge", "Test accuracy of the latest global model.",
           fmt::format("fedl_accuracy {}\n", *st.accuracy));
  }
  return t;
}

void
Coordinator::refresh_status(double now)
{
  json round = m_rounds.status();
  json key = round;
  key.erase("deadline_seconds");
  if (key != m_status_round || now - m_status_written >= 1) {
    m_status_round = std::move(key);
    write_status(std::move(round));
  }
}

void
Coordinator::write_status(json round, const json& end)
{
  const double now = FramedConnection::now();
  json j = std::move(round);
  j["schema"] = status_schema;
  j["pid"] = ::getpid();
  j["host"] = host_name();
  j["workspace"] = m_ws.root().string();
  j["listen"] = m_s.listen.to_string();
  j["started"] = m_started_utc;
  j["updated"] = utc_now();
  j["enrolled"] = m_trust ? m_trust->clients().size() : 0;
  if (!end.is_null()) {
    j.update(end);
  }
  json sites = json::array();
  const auto add_site = [&](const std::string& name) {
    json site = {{"site", name}, {"connected", false}};
    if (const auto it = m_sites.find(name); it != m_sites.end()) {
      const auto& p = *it->second;
      site["connected"] = true;
      site["address"] = p.address;
      site["connected_seconds"] = std::round(now - p.accepted_at);
      site["heard_seconds"] = std::round(now - p.conn->last_received());
    }
    sites.push_back(std::move(site));
  };
  if (m_trust) {
    for (const auto& name : m_trust->clients()) {
      add_site(name);
    }
  }
  j["sites"] = std::move(sites);
  try {
    atomic_write(m_ws.status_file(), j.dump(2) + "\n", FileMode::transient);
    m_status_failed = false;
  } catch (const Error& e) {
    if (!m_status_failed) {
      FEDL_LOG_WARN("{} (fedl status will show an old state until it can be written)", e.what());
    }
    m_status_failed = true;
  }
  m_status_written = now;
}

} // namespace fedl::core::serve_detail
