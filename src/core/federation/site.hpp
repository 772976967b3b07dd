// SPDX-License-Identifier: Apache-2.0
// The site behind run_site (session.hpp), private to it: session.cpp holds the connection, the
// protocol and the checks of a task; site_trainer.cpp the trainer thread, the signing of updates
// and the site's privacy budget.
#pragma once

#include "core/federation/session.hpp"
#include "core/format/safetensors.hpp"
#include "core/net/connection.hpp"
#include "core/net/secagg_protocol.hpp"
#include "core/net/site_protocol.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"

#include <asio/io_context.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fedl::core::join_detail {

using json = nlohmann::json;

// The most frames the site lets wait for a coordinator that does not read; past it the
// connection is dropped (and made again), so a coordinator that stops reading cannot grow the
// site's memory with updates and refusals.
constexpr std::size_t max_queued_frames = 8;
// What the trainer may run past a task's deadline before it is stopped.
constexpr double deadline_grace = 5;

// What the trainer thread is asked to do.
struct Job
{
  std::uint64_t serial = 0; // this site's number for the job: a result for an older one is dropped
  std::uint64_t task = 0;
  std::uint64_t round = 0;
  std::uint64_t attempt = 0;
  std::uint64_t seed = 0;
  std::optional<double> deadline;          // seconds the coordinator gave it, if it gave any
  std::optional<std::string> claimed_base; // the base_sha256 the coordinator says the model has
  std::shared_ptr<std::vector<std::byte>> model;
  TrainingConfig training;    // the task's settings, as checked against the contract
  std::optional<json> budget; // the site's --max-epsilon and spending, for the trainer to check
  bool secure = false;        // the task asked for secure aggregation: its update never leaves in clear
  TensorListing tensors;      // the task model's: exactly what its update must hold
};

// The update holds exactly the model's tensors (names, dtypes, shapes), nothing added or
// renamed: a module can send nothing but what training changed in its weights. Error if not.
void check_update_tensors(const TensorListing& model, const Safetensors& update);

// Why a job ended without an update: its class and the full text (which stays at the site).
struct Failure
{
  ReasonClass cls = ReasonClass::internal;
  std::string text;
  bool tell = false; // the text is about the task alone, and may go to the coordinator
};

// An update signed with the site's key, kept alive until it is sent: the trainer's bytes, the
// new safetensors header with the signature in its metadata, and the views into the bytes.
struct SignedUpdate
{
  std::vector<std::byte> bytes;
  Safetensors parsed;
  std::string header;
};

// The last update sent, kept so that the same task asked again gets the same bytes: a task is
// trained once, and sending the same output twice spends no more privacy than sending it once.
struct SentUpdate
{
  std::uint64_t task = 0;
  std::uint64_t round = 0;
  json metrics;
  std::shared_ptr<SignedUpdate> update;
};

// A secure aggregation attempt this site takes part in (site_secure.cpp): its protocol state
// and what it waits for before it sends its masked input (its neighbours' shares, its update).
// Held only while the connection lasts: the coordinator leaves a site that reconnects out of the
// attempt.
struct SecureJob
{
  std::uint64_t task = 0;
  std::uint64_t round = 0;
  SecAggSetup setup;
  secagg::Params params;
  std::unique_ptr<secagg::Client> client;
  std::map<std::uint32_t, Cert> certs; // the neighbours' (and this site's), checked against the CA
  std::optional<std::vector<secagg::SealedShares>> received;
  std::optional<secagg::Encoded> encoded;
  std::optional<std::string> dp; // the run's DP-SGD report as JSON text
  bool input_sent = false;
};

class Site
{
public:
  explicit Site(const JoinSettings& s) : m_s(s), m_retry(m_io), m_tick(m_io), m_signals(m_io, SIGINT, SIGTERM) {}
  ~Site() { stop_trainer(); }

  json run();

private:
  void connect();
  void schedule_reconnect(const std::string& why);
  void on_frame(FrameType type, json& header, const FramedConnection::BodySink& sink);
  void on_task(Job job, const Task& task);
  void on_close(const std::string& reason);
  // The trainer's answer to `job`: its result and the update's bytes, or why there is none.
  void on_trained(const Job& job, std::optional<TrainResult> result, std::vector<std::byte> body,
                  const std::optional<Failure>& failure);
  // Tells the coordinator that this site sends no update for a task: the reason class, and the
  // detail only if `tell_detail` (it says nothing of the site's data: a task setting, a contract).
  void refuse(std::uint64_t task, std::uint64_t round, ReasonClass cls, const std::string& detail, bool tell_detail);
  void send_update(const SentUpdate& sent, std::uint64_t attempt);
  void count_trained(std::uint64_t round);
  // Sends unless max_queued_frames already wait, in which case the coordinator is not reading
  // and the connection is dropped instead.
  bool can_queue();
  // Ends the job in the trainer (a newer task, a lost connection, a deadline): drops it if it
  // has not started, kills the trainer child if it has. True if it was still waiting.
  bool cancel_job(const std::string& why);
  void on_tick();
  void stop(const std::string& reason);
  // Secure aggregation (site_secure.cpp): the attempt a task starts (false if the site refused
  // it, already told), the coordinator's stage frames, the trained update to encode, and the
  // masked input once both it and the shares are there.
  bool start_secure(const Task& task, const Job& job);
  void on_secure_frame(FrameType type, const json& header, std::span<const std::byte> body);
  void secure_trained(const Job& job, const TrainResult& result, const std::vector<std::byte>& body);
  void send_secure_input();
  void abandon_secure(const std::string& why);
  secagg::Verifier secure_verifier() const;
  void trainer_loop();
  void stop_trainer();
  void give_back(std::shared_ptr<std::vector<std::byte>> model);
  // Parses the trainer's update, checks it against the task model's tensors, signs it.
  std::shared_ptr<SignedUpdate> sign(std::vector<std::byte> bytes, const TensorListing& model);
  // --max-epsilon: what the site has spent (the larger of its account and the coordinator's
  // record), checked against the coordinator's report in the welcome frame.
  PrivacyAccount budget_spent() const;
  void check_coordinator_record(const json& report);
  // Keeps the coordinator's signed ledger head of a task or done frame as a receipt.
  void keep_receipt(const json& ledger_head);
  // Tells the coordinator why this site stops, then stops with `code` once that is sent.
  void stop_after_telling(const std::string& message, ExitCode code, const json& extra);
  // Refuses `job` for the site's budget (the coordinator learns the class only) and stops, exit 4.
  void stop_for_budget(const Job& job);
  // The trainer failed `job` (class and the site's own words): refused, and counted towards
  // JoinSettings::max_failures failures in a row with the same words, at which the site stops.
  void trainer_failed(const Job& job, ReasonClass cls, const std::string& detail, bool tell_detail);

  const JoinSettings& m_s;
  asio::io_context m_io;
  asio::steady_timer m_retry;
  asio::steady_timer m_tick;
  asio::signal_set m_signals;
  Identity m_identity;
  std::string m_site;
  std::shared_ptr<TlsContext> m_tls;
  std::shared_ptr<FramedConnection> m_conn;
  bool m_welcomed = false;
  double m_heartbeat = 5;
  int m_update_signature = 1; // the newest the coordinator checks (Welcome)

  double m_dead_after = 20;
  std::uint32_t m_failures = 0;
  double m_unreachable_since = 0;
  std::string m_last_error;
  std::mt19937_64 m_rng{std::random_device{}()};

  std::uint64_t m_current_task = 0;
  std::uint64_t m_job_serial = 0;  // the last job's serial
  std::uint64_t m_busy_serial = 0; // the job handed to the trainer and not answered yet (0: none)
  std::uint64_t m_busy_task = 0;   // ... its task and round
  std::uint64_t m_busy_round = 0;
  double m_busy_deadline = 0;        // when that job must end (0: no deadline)
  bool m_busy_past_deadline = false; // ... and it was stopped for it
  std::uint64_t m_round_floor = 0;   // the latest round this site sent an update for
  std::optional<SentUpdate> m_last_sent;
  std::uint64_t m_stall_bytes = 0; // bytes the coordinator had taken at m_stall_since
  double m_stall_since = 0;
  std::uint64_t m_rounds_trained = 0;
  std::uint64_t m_last_round = 0;
  std::string m_reason;
  std::string m_fatal;
  ExitCode m_fatal_code = ExitCode::failure;
  std::uint32_t m_failed_in_a_row = 0; // tasks the trainer failed in a row with m_last_failure
  std::string m_last_failure;
  bool m_stop_when_closed = false;
  // The site's own account of its DP-SGD runs, kept whether or not it has a budget (so that a
  // budget added later starts from the truth); none only if it could not be read without one.
  std::optional<SiteAccount> m_account;
  PrivacyAccount m_coordinator_record; // what the coordinator's ledger says this site spent
  std::string m_ca_fingerprint;
  std::optional<ReceiptLog> m_receipts; // DIR/receipts.jsonl; none if it could not be read
  Cert m_ca;
  std::optional<SecureJob> m_secure;

  std::thread m_trainer;
  std::mutex m_mutex;
  std::condition_variable m_cv;
  std::optional<Job> m_next_job; // the latest task; an older one not yet started is replaced
  bool m_stopping = false;
  pid_t m_trainer_pid = -1;                              // the trainer while it works on a task; under m_mutex
  std::shared_ptr<std::vector<std::byte>> m_spare_model; // a sent task's model buffer, for the next; under m_mutex
  std::vector<std::byte> m_spare_update; // a replaced update's buffer, for the trainer's next; under m_mutex
  std::uint64_t m_running_serial = 0;    // ... and that task's job; under m_mutex
};

} // namespace fedl::core::join_detail
