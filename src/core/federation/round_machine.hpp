// SPDX-License-Identifier: Apache-2.0
// The round state machine of `fedl serve` (DESIGN §4), without sockets, threads or a clock of
// its own, so that unit tests drive it with a fake clock and fake sites
// (tests/unit/test_core_round_machine.cpp).
//
//   waiting ──quorum connected (and settled)──▶ running ──every answer, or the deadline──▶
//   aggregating ──committed──▶ waiting (next round) or finishing (rounds done, target accuracy,
//                              privacy budget)
//               ──too few valid updates──▶ waiting (the same round again, after a backoff)
//   any phase ──stop──▶ stopped
//
// It decides who is asked (seeded sampling), when an attempt closes (every participant answered,
// dropped or gone past its reconnect grace; or the deadline), which updates are refused (late,
// unexpected, twice), when to retry and when the federation is over. The coordinator feeds it
// what happens on the connections (site_joined, upload_received, ...) and tick(); the machine
// acts through a RoundHost: send a task, close an attempt (validate and aggregate elsewhere,
// then answer with attempt_committed / attempt_retry / attempt_failed), finish, fail, stop.
#pragma once

#include "core/federation/round.hpp"
#include "core/federation/serve_settings.hpp"
#include "core/privacy/privacy.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace fedl::core {

// What a task frame says about the attempt (the coordinator adds the model and the ledger head).
struct RoundTask
{
  std::uint64_t round = 0;
  std::uint32_t attempt = 0;
  std::uint64_t task = 0; // random, odd: the id an update must answer
  double deadline = 0;    // seconds left until the attempt closes
  std::uint64_t seed = 0; // the site's training seed for this round
};

// A closed attempt, to validate and aggregate.
struct AttemptClose
{
  std::uint64_t round = 0;
  std::vector<RoundCandidate> candidates; // the updates received, by site name
  // The round entry's fields about the attempt: attempt, asked, late, dropped, site_metrics,
  // seconds.
  nlohmann::json extra;
  std::optional<ClientDpRound> client_dp;
  std::uint32_t asked = 0; // sites asked: client-level DP's fixed denominator
};

// Why an update is not taken.
struct UploadRefusal
{
  std::string why;
  bool late = false; // it answers a task of this round whose attempt already closed
};

// Counters for the metrics endpoint and the summary.
struct RoundStats
{
  std::uint64_t rounds_done = 0; // by this process
  std::uint64_t retries = 0;
  std::uint64_t updates_accepted = 0;
  std::map<std::string, std::uint64_t> rejected; // by reason: invalid, late, unexpected
  double last_round_seconds = 0;
  double round_seconds_sum = 0;
  std::optional<double> accuracy; // of the latest model
};

// What the machine asks of the world around it. Each call is made on the machine's thread and
// may call back into the machine only where noted.
class RoundHost
{
public:
  virtual ~RoundHost() = default;
  // Before an attempt starts: reload the client list and CRL (may call site_removed).
  virtual void refresh_trust() = 0;
  // An attempt starts (the ledger head the tasks carry can be signed now).
  virtual void attempt_started() = 0;
  virtual void send_task(const std::string& site, const RoundTask& task) = 0;
  // The federation is over: tell `site`, which connected since.
  virtual void send_done(const std::string& site) = 0;
  // Stop receiving the upload of `site`, if any: it is no longer wanted.
  virtual void discard_upload(const std::string& site) = 0;
  // Validate and aggregate (asynchronously); answer with attempt_committed, attempt_retry or
  // attempt_failed.
  virtual void close_attempt(AttemptClose attempt) = 0;
  // Record the end (a "finished" ledger entry with `details`: round, reason, ...) and tell every
  // connected site.
  virtual void finish(nlohmann::json details) = 0;
  // Stop the coordinator with an error.
  virtual void fail(const std::string& message) = 0;
  // Stop the coordinator (a stop was requested and the machine is at a point to stop).
  virtual void stop() = 0;
};

class RoundMachine
{
public:
  enum class Phase
  {
    waiting,
    running,
    aggregating,
    finishing,
    stopped
  };
  using Clock = std::function<double()>; // seconds, monotonic

  RoundMachine(const ServeSettings& settings, RoundHost& host, Clock clock);

  // Where the ledger left the federation: the next round, the privacy spent, the latest accuracy.
  void resume(std::uint64_t next_round, FederationPrivacy privacy, std::optional<double> accuracy);
  // Sites enrolled in fedl.json: with fewer connected, a quorum waits `settle` for the others.
  void set_enrolled(std::size_t sites) { m_enrolled = sites; }
  // Starts waiting for a quorum (wait_timeout counts from here).
  void begin();

  // With a budget: the client-level epsilon after one more round at sampling rate q.
  double projected_epsilon(double q) const;

  // Connections (sites admitted after TLS and hello).
  void site_joined(const std::string& site);
  void site_left(const std::string& site, const std::string& reason);
  // Revoked or removed from fedl.json while connected: out of the quorum and of this round.
  void site_removed(const std::string& site, const std::string& why);
  // A site reported an error for `task`: it is dropped from the attempt if that is the current one,
  // and after ServeSettings::max_site_failures such errors in a row it sits out the rest of the run
  // (recorded in the attempt's ledger entry as "benched") until it connects anew.
  void site_error(const std::string& site, std::uint64_t task, const std::string& message);

  // `site` sits out the rest of the current round (its next attempts), unless that would leave
  // too few sites for a quorum.
  void exclude(const std::string& site) { m_excluded.insert(site); }

  // Uploads: check one before receiving it; refuse it (counted, and a late one recorded for the
  // ledger once per site and task); or take it.
  std::optional<UploadRefusal> check_upload(const std::string& site, std::uint64_t task, std::uint64_t round) const;
  void refuse_upload(const std::string& site, std::uint64_t task, std::uint64_t round, const UploadRefusal& refusal);
  // The coordinator could not store the upload: the site is dropped from the attempt.
  void upload_lost(const std::string& site, const std::string& why);
  // `digest`: the update's as it arrived (RoundCandidate::streamed).
  void upload_received(const std::string& site, const std::filesystem::path& file, nlohmann::json metrics,
                       std::optional<UpdateDigest> digest = std::nullopt);

  // Time: check_complete() drops participants gone past their reconnect grace and closes the
  // attempt if nobody is left pending (the coordinator calls it about once a second; the machine
  // after every answer); tick() closes an attempt at its deadline and starts one when it can.
  void check_complete();
  void tick();

  // The host's answers to close_attempt.
  void attempt_committed(const nlohmann::json& round_body);
  void attempt_retry(const std::string& why);
  void attempt_failed();

  // A stop is wanted (signal, failure): true if it can happen now, false while an attempt is
  // being aggregated (the machine calls RoundHost::stop once it is written).
  bool request_stop();
  bool stop_requested() const noexcept { return m_stop_requested; }
  void stopped() { m_phase = Phase::stopped; }

  Phase phase() const noexcept { return m_phase; }
  std::uint64_t round() const noexcept { return m_round; }
  std::uint64_t task() const noexcept { return m_task; }
  const std::string& reason() const noexcept { return m_reason; } // why the federation finished
  double finish_at() const noexcept { return m_finish_at; }       // when to stop after finishing
  std::size_t connected() const noexcept { return m_connected.size(); }
  // The connected sites that are not benched (site_error): those a round may ask.
  std::vector<std::string> eligible_sites() const;
  std::size_t eligible() const { return eligible_sites().size(); }
  const RoundStats& stats() const noexcept { return m_stats; }
  const FederationPrivacy& privacy() const noexcept { return m_privacy; }
  // The participants of the current attempt (empty while waiting).
  std::vector<std::string> participants() const;
  // The round as `fedl status` shows it (core/federation/status.hpp): state, round, rounds,
  // attempt, deadline_seconds (left, while running), participants (site, state: training,
  // reported or dropped, why), benched, recent (the last rounds this process ran: accuracy, loss,
  // epsilon, seconds, updates), accuracy, epsilon.
  nlohmann::json status() const;

private:
  struct Participant
  {
    enum class State
    {
      pending,
      received,
      dropped
    } state = State::pending;
    std::filesystem::path file;
    std::optional<UpdateDigest> digest;
    nlohmann::json metrics = nlohmann::json::object();
    std::string note;                      // why it was dropped
    std::optional<double> disconnected_at; // pending but disconnected since then (it may come back)
  };

  void maybe_start();
  void start();
  void send_task(const std::string& site);
  void close(const std::string& why);
  void finish(const std::string& reason, nlohmann::json details = nlohmann::json::object());
  // How long a participant that disconnected mid-round may take to come back for its task.
  double reconnect_grace() const { return 2 * m_s.heartbeat; }

  const ServeSettings& m_s;
  RoundHost& m_host;
  Clock m_now;

  Phase m_phase = Phase::waiting;
  std::set<std::string> m_connected;
  std::set<std::string> m_excluded;                       // for the rest of this round
  std::map<std::string, std::uint32_t> m_site_failures;   // error reports in a row, by site
  std::set<std::string> m_benched;                        // for the rest of this run (site_error)
  nlohmann::json m_benched_now = nlohmann::json::array(); // for the current attempt's entry
  std::size_t m_enrolled = 0;
  std::uint64_t m_round = 1; // the round being run (or the next one)
  std::uint32_t m_attempt = 0;
  std::uint64_t m_task = 0;
  // The tasks given in this round and the previous one (id -> round), which tell an update that
  // came too late from one that answers no task at all.
  std::map<std::uint64_t, std::uint64_t> m_issued;
  std::map<std::string, Participant> m_participants;
  double m_round_started = 0;
  double m_deadline = 0;
  std::optional<double> m_quorum_since; // a quorum has been connected since then
  double m_waiting_since = 0;
  double m_not_before = 0; // no attempt starts before this (backoff after a failed one)
  double m_finish_at = 0;
  std::uint32_t m_failed_in_a_row = 0;
  FederationPrivacy m_privacy;
  std::optional<ClientDpRound> m_client_dp;                        // the current attempt's client-level DP
  nlohmann::json m_late = nlohmann::json::array();                 // late updates, for the next attempt's entry
  std::set<std::pair<std::string, std::uint64_t>> m_late_recorded; // (site, task) already in m_late
  std::set<std::pair<std::string, std::uint64_t>> m_answered;      // (site, task) whose update was received
  std::mt19937_64 m_task_rng{std::random_device{}()};
  bool m_stop_requested = false;
  std::string m_reason;
  RoundStats m_stats;
  std::deque<nlohmann::json> m_recent; // status(): the last rounds committed, newest last
};

} // namespace fedl::core
