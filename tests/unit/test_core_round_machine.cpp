// SPDX-License-Identifier: Apache-2.0
// The coordinator's round state machine on a fake clock with fake sites: quorum and settling,
// the wait timeout, deadlines and late updates, reconnect grace, retries with backoff, seeded
// sampling, the privacy budget, the end of the federation and a stop during aggregation.
#include "core/federation/round_machine.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

using namespace fedl::core;
using json = nlohmann::json;

namespace {

// Records what the machine asks for.
struct FakeHost final : RoundHost
{
  std::vector<std::pair<std::string, RoundTask>> tasks;
  std::vector<std::string> done;
  std::vector<std::string> discarded;
  std::vector<AttemptClose> closed;
  std::vector<json> finished; // the details of each finish
  std::vector<std::string> failures;
  int stops = 0;
  int trust_refreshes = 0;
  int attempts = 0;

  void refresh_trust() override { ++trust_refreshes; }
  void attempt_started() override { ++attempts; }
  void send_task(const std::string& site, const RoundTask& task) override { tasks.emplace_back(site, task); }
  void send_done(const std::string& site) override { done.push_back(site); }
  void discard_upload(const std::string& site) override { discarded.push_back(site); }
  void close_attempt(AttemptClose attempt) override { closed.push_back(std::move(attempt)); }
  void finish(json details) override { finished.push_back(std::move(details)); }
  void fail(const std::string& message) override { failures.push_back(message); }
  void stop() override { ++stops; }

  std::vector<std::string> tasked() const
  {
    std::vector<std::string> names;
    for (const auto& [site, task] : tasks) {
      names.push_back(site);
    }
    return names;
  }
};

// A machine with its fake clock and host.
struct Fixture
{
  ServeSettings s;
  FakeHost host;
  double t = 0;
  RoundMachine m{s, host, [this] { return t; }};

  explicit Fixture(std::size_t enrolled = 2)
  {
    s.rounds = 3;
    s.min_clients = 2;
    s.round_timeout = 60;
    s.heartbeat = 5; // reconnect grace 10 s
    s.settle = 1;
    m.set_enrolled(enrolled);
    m.begin();
  }

  void at(double when)
  {
    t = when;
    m.tick();
  }

  // Uploads for the current task, as the coordinator does: check, then take.
  void upload(const std::string& site)
  {
    REQUIRE_FALSE(m.check_upload(site, m.task(), m.round()));
    m.upload_received(site, "/incoming/" + site, json::object());
  }
};

json
committed_body(std::size_t participants, std::optional<double> accuracy = std::nullopt)
{
  json body = {{"participants", json::array()}, {"rejected", json::array()}};
  for (std::size_t i = 0; i < participants; ++i) {
    body["participants"].push_back({{"site", "s" + std::to_string(i)}});
  }
  if (accuracy) {
    body["evaluation"] = {{"accuracy", *accuracy}};
  }
  return body;
}

} // namespace

TEST_CASE("round machine: a quorum of every enrolled site starts a round at once, with one task each")
{
  Fixture f;
  f.m.site_joined("a");
  CHECK(f.host.tasks.empty());
  f.m.site_joined("b");
  CHECK(f.m.phase() == RoundMachine::Phase::running);
  CHECK(f.host.tasked() == std::vector<std::string>{"a", "b"});
  CHECK(f.host.trust_refreshes == 1);
  CHECK(f.host.attempts == 1);
  const auto& task = f.host.tasks[0].second;
  CHECK(task.round == 1);
  CHECK(task.attempt == 1);
  CHECK(task.task % 2 == 1);
  CHECK(task.deadline == doctest::Approx(60));
  CHECK(f.host.tasks[1].second.task == task.task);
}

TEST_CASE("round machine: a quorum short of the enrolled sites waits `settle` seconds for the others")
{
  Fixture f(3);
  f.at(0);
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.at(0.5);
  CHECK(f.host.tasks.empty());
  f.at(1);
  CHECK(f.host.tasked() == std::vector<std::string>{"a", "b"});

  Fixture g(3);
  g.m.site_joined("a");
  g.m.site_joined("b");
  g.at(0.2);
  g.m.site_joined("c"); // the last enrolled site: no need to wait
  CHECK(g.host.tasked() == std::vector<std::string>{"a", "b", "c"});
}

TEST_CASE("round machine: without a quorum within the wait timeout, the coordinator fails")
{
  Fixture f;
  f.s.wait_timeout = 10;
  f.m.site_joined("a");
  f.at(9.9);
  CHECK(f.host.failures.empty());
  f.at(10.1);
  REQUIRE(f.host.failures.size() == 1);
  CHECK(f.host.failures[0].find("only 1 of the 2 sites that round 1 needs") != std::string::npos);
}

TEST_CASE("round machine: every answer closes the attempt; a commit moves to the next round")
{
  Fixture f;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.t = 3;
  f.upload("b");
  CHECK(f.host.closed.empty());
  f.t = 5;
  f.upload("a");
  REQUIRE(f.host.closed.size() == 1);
  CHECK(f.m.phase() == RoundMachine::Phase::aggregating);
  const auto& a = f.host.closed[0];
  CHECK(a.round == 1);
  REQUIRE(a.candidates.size() == 2);
  CHECK(a.candidates[0].expected_site == "a");
  CHECK(a.candidates[1].path == "/incoming/b");
  CHECK(a.extra["asked"] == 2);
  CHECK(a.extra["attempt"] == 1);
  CHECK(a.extra["seconds"].get<double>() == doctest::Approx(5));
  CHECK(a.extra["late"].empty());

  // An update sent again for the same task is refused, even while the round is aggregated.
  const auto again = f.m.check_upload("a", f.m.task(), 1);
  REQUIRE(again);
  CHECK(again->why == "the site already sent one for this task");
  CHECK_FALSE(again->late);

  f.t = 7;
  f.m.attempt_committed(committed_body(2, 0.5));
  CHECK(f.m.round() == 2);
  CHECK(f.m.stats().rounds_done == 1);
  CHECK(f.m.stats().updates_accepted == 2);
  CHECK(f.m.stats().last_round_seconds == doctest::Approx(7));
  CHECK(f.m.stats().accuracy == doctest::Approx(0.5));
  // Both still connected: round 2 starts at once, attempt 1 again.
  CHECK(f.m.phase() == RoundMachine::Phase::running);
  REQUIRE(f.host.tasks.size() == 4);
  CHECK(f.host.tasks[2].second.round == 2);
  CHECK(f.host.tasks[2].second.attempt == 1);
  // An update for round 1's task is now for the wrong round, not late.
  const auto stale = f.m.check_upload("a", f.host.tasks[0].second.task, 1);
  REQUIRE(stale);
  CHECK_FALSE(stale->late);
}

TEST_CASE("round machine: the deadline closes the attempt; the missing update is late, then retried with backoff")
{
  Fixture f;
  f.m.site_joined("a");
  f.m.site_joined("b");
  const auto first_task = f.m.task();
  f.t = 10;
  f.upload("a");
  f.at(59.9);
  CHECK(f.host.closed.empty());
  f.at(60);
  REQUIRE(f.host.closed.size() == 1);
  const auto& a = f.host.closed[0];
  CHECK(a.candidates.size() == 1);
  REQUIRE(a.extra["late"].size() == 1);
  CHECK(a.extra["late"][0]["site"] == "b");
  CHECK(a.extra["late"][0]["reason"] == "no update by the deadline");
  CHECK(f.host.discarded == std::vector<std::string>{"b"});
  CHECK(f.m.stats().rejected.at("late") == 1);

  // b's update for the closed attempt arrives: late, counted, recorded once for the ledger.
  const auto late = f.m.check_upload("b", first_task, 1);
  REQUIRE(late);
  CHECK(late->late);
  CHECK(late->why == "it came after the deadline of round 1");
  f.m.refuse_upload("b", first_task, 1, *late);
  f.m.refuse_upload("b", first_task, 1, *late);
  CHECK(f.m.stats().rejected.at("late") == 3);

  // Too few valid updates: the same round again after 1 s, then 2 s.
  f.t = 61;
  f.m.attempt_retry("1 valid updates of 2 asked, below the quorum of 2");
  CHECK(f.m.phase() == RoundMachine::Phase::waiting);
  CHECK(f.m.stats().retries == 1);
  f.at(61.9);
  CHECK(f.host.tasks.size() == 2);
  f.at(62);
  REQUIRE(f.host.tasks.size() == 4);
  CHECK(f.host.tasks[2].second.round == 1);
  CHECK(f.host.tasks[2].second.attempt == 2);
  CHECK(f.host.tasks[2].second.task != first_task);
  f.at(122);
  REQUIRE(f.host.closed.size() == 2);
  // The late update of attempt 1 goes into attempt 2's entry, beside attempt 2's own.
  const auto& late2 = f.host.closed[1].extra["late"];
  REQUIRE(late2.size() == 3);
  CHECK(late2[0]["reason"] == "it came after the deadline of round 1");
  f.t = 123;
  f.m.attempt_retry("none");
  f.at(124.9);
  CHECK(f.host.tasks.size() == 4);
  f.at(125);
  CHECK(f.host.tasks.size() == 6);
}

TEST_CASE("round machine: a participant that reconnects within the grace gets its task again; else it is dropped")
{
  Fixture f;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.t = 1;
  f.m.site_left("b", "connection reset");
  f.t = 5;
  f.m.site_joined("b");
  REQUIRE(f.host.tasks.size() == 3);
  CHECK(f.host.tasks[2].first == "b");
  CHECK(f.host.tasks[2].second.deadline == doctest::Approx(55));

  f.t = 6;
  f.m.site_left("b", "connection reset");
  f.upload("a");
  f.t = 15.9;
  f.m.check_complete();
  CHECK(f.host.closed.empty());
  f.t = 16;
  f.m.check_complete();
  REQUIRE(f.host.closed.size() == 1);
  const auto& dropped = f.host.closed[0].extra["dropped"];
  REQUIRE(dropped.size() == 1);
  CHECK(dropped[0]["site"] == "b");
  CHECK(dropped[0]["reason"] == "disconnected: connection reset");
  CHECK(f.host.discarded.empty());
}

TEST_CASE("round machine: a site that fails --max-site-failures tasks in a row sits out until it connects anew")
{
  Fixture f(3);
  f.s.max_site_failures = 2;
  f.s.rounds = 10;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.m.site_joined("c");
  REQUIRE(f.m.phase() == RoundMachine::Phase::running);
  // Round 1: c fails. An update resets nothing of c's.
  f.m.site_error("c", f.m.task(), "internal: the site could not train");
  f.upload("a");
  f.upload("b");
  REQUIRE(f.host.closed.size() == 1);
  CHECK_FALSE(f.host.closed[0].extra.contains("benched"));
  f.m.attempt_committed(committed_body(2));
  // Round 2: c fails again: benched, and recorded in this attempt's entry only.
  REQUIRE(f.m.phase() == RoundMachine::Phase::running);
  CHECK(f.m.participants() == std::vector<std::string>{"a", "b", "c"});
  f.m.site_error("c", f.m.task(), "internal: the site could not train");
  f.upload("a");
  f.upload("b");
  REQUIRE(f.host.closed.size() == 2);
  REQUIRE(f.host.closed[1].extra.contains("benched"));
  CHECK(f.host.closed[1].extra["benched"] ==
        json::array({{{"site", "c"}, {"failures", 2}, {"reason", "internal: the site could not train"}}}));
  CHECK(f.m.eligible() == 2);
  f.m.attempt_committed(committed_body(2));
  // Round 3 asks a and b only, and its entry has no "benched".
  REQUIRE(f.m.phase() == RoundMachine::Phase::running);
  CHECK(f.m.participants() == std::vector<std::string>{"a", "b"});
  f.upload("a");
  f.upload("b");
  CHECK_FALSE(f.host.closed[2].extra.contains("benched"));
  f.m.attempt_committed(committed_body(2));
  // c restarts (fixed): it is asked again, its count from zero.
  f.m.site_left("c", "connection closed");
  f.m.site_joined("c");
  CHECK(f.m.eligible() == 3);
  f.m.site_error("c", f.m.task(), "internal: the site could not train");
  f.upload("a");
  f.upload("b");
  CHECK_FALSE(f.host.closed[3].extra.contains("benched"));
  CHECK(f.host.failures.empty());

  // Failures with an update between them are not in a row.
  Fixture g(3);
  g.s.max_site_failures = 2;
  g.s.rounds = 10;
  for (const char* s : {"a", "b", "c"}) {
    g.m.site_joined(s);
  }
  g.m.site_error("c", g.m.task(), "x");
  g.upload("a");
  g.upload("b");
  g.m.attempt_committed(committed_body(2));
  g.upload("c");
  g.upload("a");
  g.upload("b");
  g.m.attempt_committed(committed_body(3));
  g.m.site_error("c", g.m.task(), "x");
  g.upload("a");
  g.upload("b");
  CHECK(g.m.eligible() == 3);

  // Too few left for a quorum: the coordinator stops, naming the sites.
  Fixture h(2);
  h.s.max_site_failures = 1;
  h.m.site_joined("a");
  h.m.site_joined("b");
  h.m.site_error("b", h.m.task(), "data-mismatch: the task's model does not fit the site's data");
  REQUIRE(h.host.failures.size() == 1);
  CHECK(h.host.failures[0] == "1 of the 2 sites failed 1 task in a row each (b), which leaves 1 for rounds that need "
                              "--min-clients 2: fix the sites (their logs say why) and start again");
}

TEST_CASE("round machine: a site's error for the current task drops it; one for another task does not")
{
  Fixture f;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.m.site_error("b", f.m.task() + 2, "old news");
  f.upload("a");
  CHECK(f.host.closed.empty());
  f.m.site_error("b", f.m.task(), "bad-settings: no data");
  REQUIRE(f.host.closed.size() == 1);
  CHECK(f.host.closed[0].extra["dropped"][0]["reason"] == "bad-settings: no data");
  // A dropped site's update is refused.
  Fixture g;
  g.m.site_joined("a");
  g.m.site_joined("b");
  g.m.site_removed("b", "revoked");
  const auto r = g.m.check_upload("b", g.m.task(), 1);
  REQUIRE(r);
  CHECK(r->why == "the site was dropped from this round (revoked)");
  CHECK(g.m.connected() == 1);
}

TEST_CASE("round machine: clients_per_round samples the same sites for the same seed, round and attempt")
{
  std::vector<std::string> chosen;
  for (int run = 0; run < 2; ++run) {
    Fixture f(4);
    f.s.clients_per_round = 2;
    f.s.seed = 42;
    f.s.seeded_selection = true;
    for (const char* site : {"a", "b", "c", "d"}) {
      f.m.site_joined(site);
    }
    REQUIRE(f.host.tasks.size() == 2);
    const auto names = f.host.tasked();
    if (run == 0) {
      chosen = names;
    }
    CHECK(names == chosen);
    std::string other;
    for (const char* site : {"a", "b", "c", "d"}) {
      if (std::find(names.begin(), names.end(), site) == names.end()) {
        other = site;
      }
    }
    const auto r = f.m.check_upload(other, f.m.task(), 1);
    REQUIRE(r);
    CHECK(r->why == "the site was not asked for one this round");
  }
}

TEST_CASE("round machine: the last round ends the federation; a site that connects afterwards is told")
{
  Fixture f;
  f.s.rounds = 1;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.upload("a");
  f.upload("b");
  f.t = 2;
  f.m.attempt_committed(committed_body(2));
  CHECK(f.m.phase() == RoundMachine::Phase::finishing);
  REQUIRE(f.host.finished.size() == 1);
  CHECK(f.host.finished[0]["reason"] == "rounds");
  CHECK(f.host.finished[0]["round"] == 1);
  CHECK(f.m.finish_at() == doctest::Approx(5));
  f.m.site_joined("c");
  CHECK(f.host.done == std::vector<std::string>{"c"});
}

TEST_CASE("round machine: the target accuracy ends the federation early")
{
  Fixture f;
  f.s.target_accuracy = 0.9;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.upload("a");
  f.upload("b");
  f.m.attempt_committed(committed_body(2, 0.8));
  CHECK(f.host.finished.empty());
  f.upload("a");
  f.upload("b");
  f.m.attempt_committed(committed_body(2, 0.95));
  REQUIRE(f.host.finished.size() == 1);
  CHECK(f.host.finished[0]["reason"] == "target-accuracy");
}

TEST_CASE("round machine: a round that would pass the privacy budget is not started")
{
  Fixture f;
  f.s.privacy.clip_norm = 1;
  f.s.privacy.noise_multiplier = 1;
  f.s.privacy.delta = 1e-5;
  f.s.privacy.max_epsilon = 1; // one round at q = 1 and noise 1 costs more
  f.m.site_joined("a");
  f.m.site_joined("b");
  CHECK(f.host.tasks.empty());
  REQUIRE(f.host.finished.size() == 1);
  CHECK(f.host.finished[0]["reason"] == "privacy-budget");
  CHECK(f.host.finished[0]["next_round_epsilon"].get<double>() > 1);
  CHECK(f.m.phase() == RoundMachine::Phase::finishing);

  // With room for it, the round runs with client-level DP at q = asked / connected.
  Fixture g(3);
  g.s.privacy = f.s.privacy;
  g.s.privacy.max_epsilon = 100;
  g.s.clients_per_round = 2;
  for (const char* site : {"a", "b", "c"}) {
    g.m.site_joined(site);
  }
  REQUIRE(g.host.tasks.size() == 2);
  for (const auto& [site, task] : g.host.tasks) {
    g.upload(site);
  }
  REQUIRE(g.host.closed.size() == 1);
  REQUIRE(g.host.closed[0].client_dp);
  CHECK(g.host.closed[0].client_dp->sample_rate == doctest::Approx(2.0 / 3));
  CHECK(g.host.closed[0].client_dp->selection == "secret");
  CHECK(g.host.closed[0].asked == 2);

  // A seeded selection (serve --seed) is public: accounted at rate 1, without amplification.
  Fixture h(3);
  h.s.privacy = g.s.privacy;
  h.s.clients_per_round = 2;
  h.s.seeded_selection = true;
  for (const char* site : {"a", "b", "c"}) {
    h.m.site_joined(site);
  }
  for (const auto& [site, task] : h.host.tasks) {
    h.upload(site);
  }
  REQUIRE(h.host.closed.size() == 1);
  REQUIRE(h.host.closed[0].client_dp);
  CHECK(h.host.closed[0].client_dp->sample_rate == 1);
  CHECK(h.host.closed[0].client_dp->selection == "seeded");
}

TEST_CASE("round machine: without a seed, who is asked is drawn in secret: it varies from attempt to attempt")
{
  // 20 fixtures of 2 of 6 sites: with a fixed seed all 20 would ask the same pair; drawn from the
  // CSPRNG, 15 possible pairs make 20 identical draws a 1e-23 event.
  std::set<std::vector<std::string>> seen;
  for (int run = 0; run < 20; ++run) {
    Fixture f(6);
    f.s.clients_per_round = 2;
    for (const char* site : {"a", "b", "c", "d", "e", "f"}) {
      f.m.site_joined(site);
    }
    REQUIRE(f.host.tasks.size() == 2);
    seen.insert(f.host.tasked());
  }
  CHECK(seen.size() > 1);
}

TEST_CASE("round machine: a stop asked for while a round is aggregated waits for it to be written")
{
  Fixture f;
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.upload("a");
  f.upload("b");
  CHECK_FALSE(f.m.request_stop());
  CHECK(f.host.stops == 0);
  f.m.attempt_committed(committed_body(2));
  CHECK(f.host.stops == 1);
  CHECK(f.host.tasks.size() == 2); // no round 2
  CHECK(f.m.round() == 2);

  Fixture g;
  g.m.site_joined("a");
  CHECK(g.m.request_stop()); // nothing being written: at once
}

TEST_CASE("round machine: a site excluded sits out the round's next attempts, unless too few would be left")
{
  Fixture f(3);
  f.m.site_joined("a");
  f.m.site_joined("b");
  f.m.site_joined("c");
  REQUIRE(f.m.phase() == RoundMachine::Phase::running);
  f.m.exclude("c");
  f.upload("a");
  f.upload("b");
  f.m.upload_lost("c", "accused");
  REQUIRE(f.host.closed.size() == 1);
  f.m.attempt_retry("secure aggregation failed");
  f.host.tasks.clear();
  f.at(10); // past the backoff
  CHECK(f.host.tasked() == std::vector<std::string>{"a", "b"});
  f.upload("a");
  f.upload("b");
  // The next round asks everyone again (it starts at once).
  f.host.tasks.clear();
  f.m.attempt_committed(committed_body(2));
  CHECK(f.host.tasked() == std::vector<std::string>{"a", "b", "c"});
  // Excluding so many that no quorum is left asks them all anyway.
  f.m.exclude("a");
  f.m.exclude("b");
  f.upload("a");
  f.upload("b");
  f.upload("c");
  f.m.attempt_retry("again");
  f.host.tasks.clear();
  f.at(40);
  CHECK(f.host.tasked() == std::vector<std::string>{"a", "b", "c"});
}

TEST_CASE("round machine: status() shows the round, its deadline, who reported, and the rounds done")
{
  Fixture f(3);
  f.m.site_joined("a");
  auto st = f.m.status();
  CHECK(st["state"] == "waiting");
  CHECK(st["round"] == 1);
  CHECK(st["rounds"] == 3);
  CHECK(st["participants"].empty());
  CHECK(st["deadline_seconds"].is_null());
  f.m.site_joined("b");
  f.m.site_joined("c");
  f.at(10);
  f.upload("a");
  f.m.site_error("c", f.m.task(), "data: no rows");
  st = f.m.status();
  CHECK(st["state"] == "running");
  CHECK(st["attempt"] == 1);
  CHECK(st["deadline_seconds"].get<double>() == doctest::Approx(50));
  CHECK(st["participants"] == json::parse(R"([{"site": "a", "state": "reported"}, {"site": "b", "state": "training"},
    {"site": "c", "state": "dropped", "why": "data: no rows"}])"));
  f.m.site_left("b", "eof");
  CHECK(f.m.status()["participants"][1]["state"] == "disconnected");
  f.m.site_joined("b");
  f.upload("b");
  REQUIRE(f.m.phase() == RoundMachine::Phase::aggregating);
  CHECK(f.m.status()["state"] == "aggregating");
  auto body = committed_body(2, 0.75);
  f.t = 12;
  f.m.attempt_committed(body);
  st = f.m.status();
  CHECK(st["round"] == 2);
  CHECK(st["accuracy"] == 0.75);
  CHECK(st["epsilon"].is_null()); // no client-level DP
  REQUIRE(st["recent"].size() == 1);
  CHECK(st["recent"][0]["round"] == 1);
  CHECK(st["recent"][0]["updates"] == 2);
  CHECK(st["recent"][0]["accuracy"] == 0.75);
  CHECK(st["recent"][0]["seconds"].get<double>() == doctest::Approx(12)); // from the tasks at 0
}
