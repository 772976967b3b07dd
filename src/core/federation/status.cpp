// SPDX-License-Identifier: Apache-2.0
#include "core/federation/status.hpp"

#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <csignal>
#include <fstream>
#include <iterator>
#include <set>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using json = nlohmann::json;

constexpr std::uintmax_t max_status_bytes = std::uintmax_t{16} << 20;

const std::set<std::string> live_states = {"waiting", "running", "aggregating", "finishing"};

// "4 s", "3 min", "2 h 5 min".
std::string
span_text(double seconds)
{
  const auto s = static_cast<long long>(std::max(0.0, std::round(seconds)));
  if (s < 120) {
    return fmt::format("{} s", s);
  }
  if (s < 7200) {
    return fmt::format("{} min", s / 60);
  }
  return fmt::format("{} h {} min", s / 3600, s / 60 % 60);
}

// A name or text the status file holds, for a terminal.
std::string
safe(const json& j, const char* key)
{
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? terminal_text(it->get<std::string>()) : std::string();
}

double
number(const json& j, const char* key, double fallback = 0)
{
  const auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}

// Whether process `pid` exists on this machine.
bool
process_exists(long long pid)
{
  return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

std::string
round_line(const json& r)
{
  std::string s = fmt::format("  round {}:", static_cast<std::uint64_t>(number(r, "round")));
  if (r.contains("accuracy") && r["accuracy"].is_number()) {
    s += fmt::format(" accuracy {:.2f}%", r["accuracy"].get<double>() * 100);
  }
  if (r.contains("loss") && r["loss"].is_number()) {
    s += fmt::format(", loss {:.4g}", r["loss"].get<double>());
  }
  if (r.contains("epsilon") && r["epsilon"].is_number()) {
    s += fmt::format(", epsilon {:.4g}", r["epsilon"].get<double>());
  }
  s += fmt::format(", {}, {:.1f} s\n", count_of(static_cast<std::uint64_t>(number(r, "updates")), "update"),
                   number(r, "seconds"));
  return s;
}

} // namespace

std::string
host_name()
{
  std::array<char, 256> name{};
  if (::gethostname(name.data(), name.size() - 1) != 0) {
    return {};
  }
  return name.data();
}

std::optional<StatusReport>
read_status(const Workspace& ws)
{
  const auto path = ws.status_file();
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec == std::errc::no_such_file_or_directory) {
    return std::nullopt;
  }
  if (ec) {
    throw Error("cannot read {}: {}", path.string(), ec.message());
  }
  if (size > max_status_bytes) {
    throw Error("{} is {} bytes, more than a status file holds ({}): not written by fedl serve", path.string(), size,
                max_status_bytes);
  }
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in && !in.eof()) {
    throw Error("cannot read {}", path.string());
  }
  StatusReport r;
  r.doc = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (!r.doc.is_object() || !r.doc.contains("schema") || !r.doc.contains("state") || !r.doc.contains("updated")) {
    throw Error("{} is not a fedl status file (is it from fedl serve? a coordinator rewrites it within a second)",
                path.string());
  }
  if (r.doc["schema"] != status_schema) {
    throw Error("{} has status schema {}, this fedl reads {}: use the fedl that runs the coordinator", path.string(),
                r.doc["schema"].dump(), status_schema);
  }
  const auto updated = parse_utc(safe(r.doc, "updated"));
  const double age =
    updated ? std::chrono::duration<double>(std::chrono::system_clock::now() - *updated).count() : status_stale_after;
  r.doc["age_seconds"] = std::max(0.0, age);
  const bool live = live_states.count(safe(r.doc, "state")) > 0;
  const bool here = safe(r.doc, "host") == host_name();
  const auto pid = static_cast<long long>(number(r.doc, "pid"));
  r.running = live && age < status_stale_after && (!here || process_exists(pid));
  r.doc["running"] = r.running;
  r.text = status_text(r.doc);
  return r;
}

std::string
status_text(const json& doc)
{
  std::string t;
  const auto state = safe(doc, "state");
  const auto pid = static_cast<long long>(number(doc, "pid"));
  const double age = number(doc, "age_seconds");
  const auto rounds = static_cast<std::uint64_t>(number(doc, "rounds"));
  const auto round = static_cast<std::uint64_t>(number(doc, "round"));
  t += fmt::format("coordinator of {} (pid {}, listening on {}), status from {} ago\n", safe(doc, "workspace"), pid,
                   safe(doc, "listen"), span_text(age));
  const bool running = doc.value("running", false);
  if (!running && live_states.count(state) > 0) {
    t += fmt::format("not running: it stopped without recording an end (killed, or its machine restarted) in round {} "
                     "of {}; `fedl serve` resumes from the ledger, `fedl audit` shows what was recorded\n",
                     round, rounds);
  } else if (state == "finished") {
    t += fmt::format("finished after round {} of {} ({})\n", round, rounds, safe(doc, "reason"));
  } else if (state == "interrupted") {
    t += fmt::format("interrupted in round {} of {}: `fedl serve` resumes from the ledger\n", round, rounds);
  } else if (state == "failed") {
    t += fmt::format("failed in round {} of {}: {}\n", round, rounds, safe(doc, "error"));
  } else if (state == "waiting") {
    t += fmt::format("round {} of {}: waiting for a quorum of {} sites\n", round, rounds,
                     static_cast<std::uint64_t>(number(doc, "quorum")));
  } else {
    const auto attempt = static_cast<std::uint64_t>(number(doc, "attempt"));
    t += fmt::format("round {} of {}{}: {}", round, rounds, attempt > 1 ? fmt::format(" (attempt {})", attempt) : "",
                     state);
    if (doc.contains("deadline_seconds") && doc["deadline_seconds"].is_number()) {
      t += fmt::format(", {} left before the deadline", span_text(doc["deadline_seconds"].get<double>()));
    }
    t += "\n";
  }
  if (running && doc.contains("participants") && doc["participants"].is_array() && !doc["participants"].empty()) {
    const auto& parts = doc["participants"];
    std::size_t reported = 0;
    for (const auto& p : parts) {
      reported += safe(p, "state") == "reported" ? 1 : 0;
    }
    t += fmt::format("asked {}, {} reported:\n", parts.size(), reported);
    for (const auto& p : parts) {
      t += fmt::format("  {:<20} {}{}\n", safe(p, "site"), safe(p, "state"),
                       p.contains("why") ? fmt::format(" ({})", safe(p, "why")) : "");
    }
  }
  if (doc.contains("sites") && doc["sites"].is_array()) {
    std::size_t connected = 0;
    for (const auto& s : doc["sites"]) {
      connected += s.value("connected", false) ? 1 : 0;
    }
    std::set<std::string> benched;
    if (doc.contains("benched") && doc["benched"].is_array()) {
      for (const auto& b : doc["benched"]) {
        benched.insert(b.is_string() ? b.get<std::string>() : "");
      }
    }
    t += fmt::format("sites: {} of {} connected\n", connected, doc["sites"].size());
    for (const auto& s : doc["sites"]) {
      const auto name = safe(s, "site");
      if (!s.value("connected", false)) {
        t += fmt::format("  {:<20} not connected\n", name);
        continue;
      }
      t += fmt::format("  {:<20} {:<15} connected for {}, last heard {} ago{}\n", name, safe(s, "address"),
                       span_text(number(s, "connected_seconds")), span_text(number(s, "heard_seconds")),
                       benched.count(name) > 0 ? " (benched: failed too many tasks in a row)" : "");
    }
  }
  if (doc.contains("recent") && doc["recent"].is_array() && !doc["recent"].empty()) {
    t += "recent rounds:\n";
    for (const auto& r : doc["recent"]) {
      t += round_line(r);
    }
  }
  return t;
}

} // namespace fedl::core
