// SPDX-License-Identifier: Apache-2.0
#include "core/federation/session.hpp"

#include "core/format/safetensors.hpp"
#include "core/net/child.hpp"
#include "core/net/connection.hpp"
#include "core/net/site_protocol.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <asio/connect.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>

#include <condition_variable>
#include <csignal>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using tcp = asio::ip::tcp;
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
};

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

// TLS alerts and verification failures that retrying cannot fix.
bool
is_certificate_refusal(const std::string& reason)
{
  for (const char* word : {"certificate", "unknown ca", "bad certificate", "access denied"}) {
    if (reason.find(word) != std::string::npos) {
      return true;
    }
  }
  return false;
}

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
  // Sends unless max_queued_frames already wait, in which case the coordinator is not reading
  // and the connection is dropped instead.
  bool can_queue();
  // Ends the job in the trainer (a newer task, a lost connection, a deadline): drops it if it
  // has not started, kills the trainer child if it has. True if it was still waiting.
  bool cancel_job(const std::string& why);
  void on_tick();
  void stop(const std::string& reason);
  void trainer_loop();
  void stop_trainer();
  std::shared_ptr<SignedUpdate> sign(std::vector<std::byte> bytes);
  // --max-epsilon: what the site has spent (the larger of its account and the coordinator's
  // record), checked against the coordinator's report in the welcome frame.
  RdpAccount budget_spent() const;
  void check_coordinator_record(const json& report);
  // Keeps the coordinator's signed ledger head of a task or done frame as a receipt.
  void keep_receipt(const json& ledger_head);
  // Tells the coordinator why this site stops, then stops with `code` once that is sent.
  void stop_after_telling(const std::string& message, ExitCode code, const json& extra);
  // Refuses `job` for the site's budget (the coordinator learns the class only) and stops, exit 4.
  void stop_for_budget(const Job& job);

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
  bool m_stop_when_closed = false;
  // The site's own account of its DP-SGD runs, kept whether or not it has a budget (so that a
  // budget added later starts from the truth); none only if it could not be read without one.
  std::optional<SiteAccount> m_account;
  RdpAccount m_coordinator_record; // what the coordinator's ledger says this site spent
  std::string m_ca_fingerprint;
  std::optional<ReceiptLog> m_receipts; // DIR/receipts.jsonl; none if it could not be read

  std::thread m_trainer;
  std::mutex m_mutex;
  std::condition_variable m_cv;
  std::optional<Job> m_next_job; // the latest task; an older one not yet started is replaced
  bool m_stopping = false;
  pid_t m_trainer_pid = -1;           // the trainer while it works on a task; under m_mutex
  std::uint64_t m_running_serial = 0; // ... and that task's job; under m_mutex
};

void
Site::connect()
{
  if (!m_reason.empty()) {
    return;
  }
  m_welcomed = false;
  auto socket = std::make_shared<tcp::socket>(m_io);
  auto resolver = std::make_shared<tcp::resolver>(m_io);
  resolver->async_resolve(
    m_s.server.host, std::to_string(m_s.server.port),
    [this, socket, resolver](const std::error_code& ec, const tcp::resolver::results_type& results) {
      if (ec) {
        schedule_reconnect(fmt::format("cannot resolve {}: {}", m_s.server.host, ec.message()));
        return;
      }
      asio::async_connect(*socket, results, [this, socket](const std::error_code& error, const tcp::endpoint&) {
        if (error) {
          schedule_reconnect(fmt::format("cannot connect to {}: {}", m_s.server.to_string(), error.message()));
          return;
        }
        FrameLimits limits;
        limits.allow(FrameType::welcome)
          .allow(FrameType::task, m_s.max_model_bytes)
          .allow(FrameType::heartbeat)
          .allow(FrameType::done)
          .allow(FrameType::error);
        FramedConnection::Callbacks cb;
        cb.on_ready = [this] { m_conn->send(FrameType::hello, Hello{m_site}.to_header()); };
        cb.on_head = [this](const FramePrefix& prefix, const json&) {
          auto buffer = std::make_shared<std::vector<std::byte>>();
          if (m_s.contract && prefix.type == FrameType::task) {
            // The contract bounds the body to the model's size: room for it at once, rather than
            // a buffer that doubles as the bytes come (1.7 times the model at its peak).
            buffer->reserve(prefix.body_size);
          }
          return FramedConnection::BodySink{std::move(buffer), -1};
        };
        cb.on_frame = [this](FrameType type, json& header, const FramedConnection::BodySink& sink) {
          on_frame(type, header, sink);
        };
        cb.on_close = [this](const std::string& reason) { on_close(reason); };
        try {
          m_conn =
            std::make_shared<FramedConnection>(std::make_unique<TlsStream>(std::move(*socket), m_tls), limits, cb);
          m_conn->start();
        } catch (const Error& e) {
          schedule_reconnect(e.what());
        }
      });
    });
}

void
Site::schedule_reconnect(const std::string& why)
{
  if (!m_reason.empty()) {
    return;
  }
  const double now = FramedConnection::now();
  if (m_unreachable_since == 0) {
    m_unreachable_since = now;
  }
  m_last_error = why;
  if (m_s.retry_for > 0 && now - m_unreachable_since > m_s.retry_for) {
    m_fatal = fmt::format("gave up after {:.0f} s without the coordinator at {} (--retry-for): {}",
                          now - m_unreachable_since, m_s.server.to_string(), why);
    stop("failed");
    return;
  }
  // Exponential backoff, capped, with "equal jitter": half fixed, half random, so that sites
  // cut off together do not all come back at the same instant.
  const double cap = std::min(m_s.retry_max, m_s.retry_initial * std::pow(2.0, std::min(m_failures, 30U)));
  ++m_failures;
  const double delay = cap / 2 + std::uniform_real_distribution<double>(0, cap / 2)(m_rng);
  FEDL_LOG_WARN("{}; retrying in {:.1f} s", why, delay);
  m_retry.expires_after(
    std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(delay)));
  m_retry.async_wait([this](const std::error_code& ec) {
    if (!ec) {
      connect();
    }
  });
}

void
Site::on_close(const std::string& reason)
{
  const bool was_welcomed = m_welcomed;
  m_welcomed = false;
  if (!m_reason.empty()) {
    return;
  }
  if (m_busy_serial != 0) {
    // Its update could not be sent: the coordinator asks again when it wants it.
    cancel_job("lost the coordinator");
    m_busy_serial = 0;
  }
  if (m_stop_when_closed) {
    stop("failed");
    return;
  }
  if (!was_welcomed && is_certificate_refusal(reason)) {
    m_fatal_code = ExitCode::verify;
    m_fatal = fmt::format("the coordinator at {} refused this site's certificate, or presented one that is not "
                          "valid for {}: {}",
                          m_s.server.to_string(), m_s.server_name, reason);
    stop("failed");
    return;
  }
  schedule_reconnect(was_welcomed ? fmt::format("lost the coordinator: {}", reason)
                                  : fmt::format("connection to {} failed: {}", m_s.server.to_string(), reason));
}

void
Site::on_frame(FrameType type, json& header, const FramedConnection::BodySink& sink)
{
  switch (type) {
  case FrameType::welcome: {
    const auto welcome = Welcome::from_header(header);
    m_welcomed = true;
    m_failures = 0;
    // A task from before this connection is void: the coordinator sends it again if it still wants it.
    m_current_task = 0;
    m_unreachable_since = 0;
    m_heartbeat = std::clamp(welcome.heartbeat, 0.1, 3600.0);
    m_dead_after = 4 * m_heartbeat;
    FEDL_LOG_INFO("connected to {} as {}; the federation is at round {} of {}", m_s.server.to_string(), m_site,
                  welcome.round, welcome.rounds);
    if (m_s.max_epsilon) {
      check_coordinator_record(welcome.privacy);
    }
    return;
  }
  case FrameType::task: {
    auto task = Task::from_header(header);
    Job job;
    job.task = task.task;
    job.round = task.round;
    job.model = sink.memory;
    if (!job.model || job.task == 0) {
      m_conn->send_error_and_close("protocol error: a task without a model or task id", 1);
      return;
    }
    keep_receipt(task.ledger_head);
    on_task(std::move(job), task);
    return;
  }
  case FrameType::heartbeat:
    return;
  case FrameType::done: {
    const auto done = Done::from_header(header);
    keep_receipt(done.ledger_head);
    m_last_round = done.rounds;
    FEDL_LOG_INFO("the federation is finished after round {} ({})", m_last_round,
                  done.reason.empty() ? "done" : done.reason);
    stop("done");
    return;
  }
  case FrameType::error: {
    const auto report = ErrorReport::from_header(header);
    const auto& message = report.message;
    if (report.code == static_cast<int>(ExitCode::verify)) {
      m_fatal_code = ExitCode::verify;
      m_fatal = fmt::format("the coordinator refused this site: {}", message);
      stop("failed");
      return;
    }
    if (report.replaced) {
      // Only another live process with this site's key can take over its connection: two
      // fedl join for one site would otherwise replace each other for ever.
      m_fatal = fmt::format("another fedl join for site {} connected to the coordinator; this one stops", m_site);
      stop("failed");
      return;
    }
    FEDL_LOG_WARN("the coordinator says: {}", message);
    return;
  }
  default:
    return;
  }
}

// A task is held against the contract and the site's own limits here, before anything is
// allocated for its model or the trainer sees it.
void
Site::on_task(Job job, const Task& task)
{
  if (m_busy_serial != 0 && m_busy_task == job.task) {
    FEDL_LOG_DEBUG("round {}: task {} asked again while it trains", job.round, job.task);
    return;
  }
  if (m_last_sent && m_last_sent->task == job.task) {
    // Trained once: the same bytes again, whatever the coordinator sends with the task this time.
    FEDL_LOG_INFO("round {}: the coordinator asks again for the update this site sent; sending it again",
                  m_last_sent->round);
    if (can_queue()) {
      send_update(*m_last_sent, task.attempt);
    }
    return;
  }
  if (m_busy_serial != 0) {
    cancel_job("the coordinator sent a newer task");
    m_busy_serial = 0;
  }
  m_current_task = job.task;
  ReasonClass cls = ReasonClass::bad_settings;
  std::string part = "the task";
  try {
    if (job.round < m_round_floor) {
      throw UsageError("the task is for round {}, but this site already sent its update for round {}", job.round,
                       m_round_floor);
    }
    job.seed = task.seed;
    job.attempt = task.attempt;
    job.deadline = task.deadline;
    if (job.deadline && !(*job.deadline >= 0)) {
      throw UsageError("the task's deadline is not a number of seconds");
    }
    job.claimed_base = task.base_sha256;
    job.training = training_from_json(task.training, "the task");
    part = "the task's training";
    if (m_s.contract) {
      check_task_training(*m_s.contract, job.training);
    }
    if (m_s.max_epochs && job.training.epochs > *m_s.max_epochs) {
      throw UsageError("{} epochs, more than this site's --max-epochs {}", job.training.epochs, *m_s.max_epochs);
    }
    if (m_s.min_noise_multiplier &&
        (!job.training.dp || job.training.dp->noise_multiplier < *m_s.min_noise_multiplier)) {
      throw UsageError("DP-SGD noise multiplier {}, below this site's --min-noise-multiplier {:g}",
                       job.training.dp ? fmt::format("{:g}", job.training.dp->noise_multiplier) : std::string("none"),
                       *m_s.min_noise_multiplier);
    }
    if (m_s.max_epsilon && !job.training.dp) {
      throw UsageError("training without DP-SGD, which this site's --max-epsilon does not allow");
    }
    cls = ReasonClass::bad_model;
    part = "the task's model";
    const auto model = parse_safetensors(*job.model, part);
    if (m_s.contract) {
      check_task_model(*m_s.contract, model);
    }
  } catch (const std::exception& e) {
    // About the coordinator's own task and this site's contract: the detail may go back.
    const std::string text = e.what();
    refuse(job.task, job.round, cls, text.starts_with(part) || text.starts_with("the task") ? text : part + ": " + text,
           true);
    return;
  }
  if (m_s.max_epsilon) {
    job.budget = json{{"max_epsilon", *m_s.max_epsilon}, {"delta", m_s.delta}, {"spent", budget_spent().to_json()}};
  }
  job.serial = ++m_job_serial;
  m_busy_serial = job.serial;
  m_busy_task = job.task;
  m_busy_round = job.round;
  m_busy_past_deadline = false;
  m_busy_deadline = job.deadline ? FramedConnection::now() + *job.deadline + deadline_grace : 0;
  FEDL_LOG_INFO("round {}: training", job.round);
  {
    const std::lock_guard lock(m_mutex);
    m_next_job = std::move(job);
  }
  m_cv.notify_one();
}

void
Site::refuse(std::uint64_t task, std::uint64_t round, ReasonClass cls, const std::string& detail, bool tell_detail)
{
  FEDL_LOG_ERROR("round {}: no update for this task ({}): {}", round, reason_class_name(cls), detail);
  if (!m_conn || !m_conn->is_open() || !m_welcomed || !can_queue()) {
    return;
  }
  const auto message = fmt::format("{}: {}", reason_class_name(cls), tell_detail ? detail : reason_class_text(cls));
  ErrorReport report{valid_utf8(message, 500), 1, task, round, std::string(reason_class_name(cls))};
  m_conn->send(FrameType::error, report.to_header());
}

bool
Site::can_queue()
{
  if (m_conn->queued() < max_queued_frames) {
    return true;
  }
  m_conn->close(fmt::format("the coordinator is not reading: {} frames wait to be sent", m_conn->queued()));
  return false;
}

void
Site::send_update(const SentUpdate& sent, std::uint64_t attempt)
{
  std::vector<std::span<const std::byte>> parts{as_bytes(sent.update->header)};
  for (const auto* t : serialize_order(sent.update->parsed.tensors)) {
    parts.push_back(t->data);
  }
  m_conn->send(FrameType::update, Update{sent.round, sent.task, attempt, sent.metrics}.to_header(), std::move(parts),
               sent.update);
}

bool
Site::cancel_job(const std::string& why)
{
  const std::lock_guard lock(m_mutex);
  if (m_next_job && m_next_job->serial == m_busy_serial) {
    m_next_job.reset();
    return true;
  }
  if (m_trainer_pid > 0 && m_running_serial == m_busy_serial) {
    FEDL_LOG_WARN("stopping the trainer: {}", why);
    ::kill(m_trainer_pid, SIGKILL);
  }
  return false;
}

void
Site::keep_receipt(const json& ledger_head)
{
  if (ledger_head.is_null() || !m_receipts) {
    return;
  }
  const auto r = parse_receipt(ledger_head);
  const auto server = m_conn ? m_conn->stream().peer_certificate() : Cert{};
  if (!r || r->ca != m_ca_fingerprint || !server || !verify_receipt(*r, server)) {
    FEDL_LOG_WARN("the coordinator sent a ledger head that is malformed, of another federation, or not signed by "
                  "its certificate; not kept as a receipt");
    return;
  }
  try {
    if (const auto warning = m_receipts->add(*r)) {
      FEDL_LOG_ERROR("{}", *warning);
    }
  } catch (const Error& e) {
    FEDL_LOG_WARN("cannot keep the coordinator's ledger head: {}", e.what());
  }
}

std::shared_ptr<SignedUpdate>
Site::sign(std::vector<std::byte> bytes)
{
  auto u = std::make_shared<SignedUpdate>();
  u->bytes = std::move(bytes);
  u->parsed = parse_safetensors(u->bytes, "the trainer's update");
  auto& meta = u->parsed.metadata;
  sign_update(u->parsed.tensors, meta, m_identity);
  u->header = safetensors_header(serialize_order(u->parsed.tensors), meta);
  return u;
}

void
Site::on_trained(const Job& job, std::optional<TrainResult> result, std::vector<std::byte> body,
                 const std::optional<Failure>& failure)
{
  if (job.serial != m_busy_serial) {
    return; // cancelled: a newer task, or a lost connection (whose task is asked for again)
  }
  m_busy_serial = 0;
  if (job.task != m_current_task || !m_conn || !m_conn->is_open() || !m_welcomed) {
    FEDL_LOG_INFO("round {}: the coordinator has moved on; this update is not sent", job.round);
    return;
  }
  if (!can_queue()) {
    return; // the coordinator is not reading: nothing is spent on an update that cannot leave
  }
  if (m_busy_past_deadline) {
    refuse(job.task, job.round, ReasonClass::internal,
           "training did not end by the task's deadline; the trainer was stopped", true);
    return;
  }
  // The trainer's reply is read here, outside the connection's handler: a field of the wrong
  // type is a failed task, never the end of the site.
  std::shared_ptr<SignedUpdate> u;
  json metrics;
  try {
    if (failure && failure->cls == ReasonClass::budget) {
      FEDL_LOG_ERROR("round {}: refusing the task: {}", job.round, failure->text);
      stop_for_budget(job);
      return;
    }
    if (failure || !result) {
      // The trainer's words may quote the site's data (a label, a path): they stay here, unless
      // the failure is about the task alone.
      refuse(job.task, job.round, failure ? failure->cls : ReasonClass::internal,
             failure ? failure->text : std::string("the trainer did not answer"), failure && failure->tell);
      return;
    }
    metrics = {{"num_samples", result->num_samples}, {"steps", result->steps}, {"seconds", result->seconds}};
    // Absent under DP-SGD: the trainer keeps the loss of private data to itself.
    if (result->loss) {
      metrics["loss"] = *result->loss;
    }
    if (m_account && result->dp) {
      const auto report = DpSgdReport::from_json(*result->dp, "the trainer's DP-SGD report");
      if (m_s.max_epsilon) {
        // Checked again now, as one step with the append and the send: the budget the trainer
        // was given may predate an update sent since.
        auto after = budget_spent();
        const double before = after.epsilon(m_s.delta).epsilon;
        report.add_to(after);
        const double eps = after.epsilon(m_s.delta).epsilon;
        if (eps > *m_s.max_epsilon) {
          FEDL_LOG_ERROR("round {}: not sending this update: it would take the site's epsilon from {:.4g} to {:.4g} "
                         "at delta {:g}, past its --max-epsilon {:g}",
                         job.round, before, eps, m_s.delta, *m_s.max_epsilon);
          stop_for_budget(job);
          return;
        }
      }
      // Written (and synced) before the update leaves: a crash from here on over-counts. A run of
      // no steps spent nothing and is not written.
      if (report.steps > 0) {
        m_account->append(report, {{"round", job.round}, {"task", job.task}, {"server", m_s.server.to_string()}});
      }
      if (m_s.max_epsilon) {
        FEDL_LOG_INFO("round {}: privacy account: epsilon {:.4g} of {:g} at delta {:g}", job.round,
                      budget_spent().epsilon(m_s.delta).epsilon, *m_s.max_epsilon, m_s.delta);
      }
    } else if (m_s.max_epsilon) {
      throw Error("the trainer sent no DP-SGD report for a task under this site's budget");
    }
    u = sign(std::move(body));
  } catch (const std::exception& e) {
    refuse(job.task, job.round, ReasonClass::internal, e.what(), false);
    return;
  }
  m_last_sent = SentUpdate{job.task, job.round, metrics, u};
  send_update(*m_last_sent, job.attempt);
  m_round_floor = std::max(m_round_floor, job.round);
  ++m_rounds_trained;
  m_last_round = job.round;
  FEDL_LOG_INFO("round {}: update sent ({}{} samples, {:.1f} s)", job.round,
                metrics.contains("loss") ? fmt::format("loss {:.4f}, ", metrics["loss"].get<double>()) : std::string(),
                metrics["num_samples"].get<std::uint64_t>(), metrics["seconds"].get<double>());
}

// The trainer thread: owns the trainer child, started with the first task and restarted if it
// dies, and runs one task at a time.
void
Site::trainer_loop()
{
  TrainerClient trainer(m_s.trainer_argv);
  bool started = false;
  for (;;) {
    Job job;
    {
      std::unique_lock lock(m_mutex);
      const auto ready = [&] { return m_stopping || m_next_job.has_value(); };
      if (started && m_s.trainer_idle > 0) {
        // An idle trainer gives its memory back after a while (edge boxes, many sites per host).
        if (!m_cv.wait_for(lock, std::chrono::duration<double>(m_s.trainer_idle), ready)) {
          lock.unlock();
          FEDL_LOG_DEBUG("stopping the idle trainer ({} s without a task)", m_s.trainer_idle);
          trainer.stop();
          started = false;
          continue;
        }
      } else {
        m_cv.wait(lock, ready);
      }
      if (m_stopping) {
        return;
      }
      job = std::move(*m_next_job);
      m_next_job.reset();
    }
    std::optional<TrainResult> result;
    std::vector<std::byte> body;
    std::optional<Failure> failure;
    try {
      // The site hashes the model it was sent, always: the update it signs names that base.
      TrainTask task{job.round, job.seed, job.training, sha256_hex(*job.model), job.budget};
      if (job.claimed_base && *job.claimed_base != *task.base_sha256) {
        throw Failure{ReasonClass::bad_model, "the task's base_sha256 is not the SHA-256 of its model", true};
      }
      {
        // Busy from here to the reply: cancel_job() and stop_trainer() may kill it (it is not
        // reaped meanwhile, except by the client finding it dead, so the pid is ours).
        const std::lock_guard lock(m_mutex);
        if (m_stopping) {
          return;
        }
        m_trainer_pid = trainer.start();
        m_running_serial = job.serial;
        started = true;
      }
      // An update is the model's size plus its metadata: the trainer cannot make this process
      // allocate more than that, whatever it claims.
      const auto max_update = job.model->size() + (std::uint64_t{4} << 20);
      auto answer = trainer.train(task, *job.model, max_update, [&] { job.model.reset(); });
      if (auto* e = std::get_if<ChildError>(&answer)) {
        failure = Failure{e->cls, valid_utf8(e->message), false};
      } else {
        auto& [r, bytes] = std::get<0>(answer);
        result = r;
        body = std::move(bytes);
      }
    } catch (const Failure& f) {
      failure = f;
    } catch (const std::exception& e) {
      failure = Failure{ReasonClass::internal, fmt::format("the trainer failed: {}", e.what())};
    }
    {
      const std::lock_guard lock(m_mutex);
      m_trainer_pid = -1;
      m_running_serial = 0;
    }
    job.model.reset();
    asio::post(m_io, [this, job = std::move(job), result, body = std::move(body), failure]() mutable {
      on_trained(job, result, std::move(body), failure);
    });
  }
}

void
Site::stop_trainer()
{
  {
    const std::lock_guard lock(m_mutex);
    m_stopping = true;
    // A task in progress would hold the exit until it finished: end the trainer now (its
    // thread then sees the broken pipe, and the WorkerProcess reaps it).
    if (m_trainer_pid > 0) {
      ::kill(m_trainer_pid, SIGKILL);
    }
  }
  m_cv.notify_all();
  if (m_trainer.joinable()) {
    m_trainer.join();
  }
}

void
Site::stop(const std::string& reason)
{
  if (!m_reason.empty()) {
    return;
  }
  m_reason = reason;
  m_retry.cancel();
  m_tick.cancel();
  m_signals.cancel();
  if (m_conn) {
    m_conn->close("the site is stopping");
  }
  m_io.stop();
}

RdpAccount
Site::budget_spent() const
{
  auto spent = m_account->spent();
  spent.merge_max(m_coordinator_record);
  return spent;
}

void
Site::check_coordinator_record(const json& report)
{
  const auto path = m_s.bundle / "privacy.jsonl";
  if (report.is_null()) {
    return;
  }
  RdpAccount record;
  std::uint64_t runs = 0;
  try {
    record = RdpAccount::from_json(report, "the coordinator's record of this site's privacy spending");
    runs = header_uint(report, "runs");
  } catch (const std::exception& e) {
    FEDL_LOG_WARN("{}; ignoring it", e.what());
    return;
  }
  const double theirs = record.epsilon(m_s.delta).epsilon;
  if (!m_account->existed() || m_account->runs() < runs) {
    stop_after_telling(
      fmt::format("site {} refuses to train: {} {}, but the coordinator's ledger records {} DP-SGD runs of this site "
                  "(epsilon {:.4g} at delta {:g}): the site's privacy account was deleted or cut short; restore it "
                  "from a backup",
                  m_site, path.string(),
                  m_account->existed() ? fmt::format("records {} runs", m_account->runs()) : std::string("is missing"),
                  runs, theirs, m_s.delta),
      ExitCode::verify, json::object());
    return;
  }
  m_coordinator_record = record;
  const double ours = m_account->spent().epsilon(m_s.delta).epsilon;
  if (theirs > ours) {
    FEDL_LOG_WARN("the coordinator's ledger says this site spent epsilon {:.4g}, more than its own account's {:.4g}; "
                  "counting the larger",
                  theirs, ours);
  }
}

void
Site::stop_after_telling(const std::string& message, ExitCode code, const json& extra)
{
  m_fatal = message;
  m_fatal_code = code;
  if (!m_conn || !m_conn->is_open()) {
    stop("failed");
    return;
  }
  m_stop_when_closed = true;
  m_conn->send_error_and_close(message, static_cast<int>(code), extra);
}

void
Site::stop_for_budget(const Job& job)
{
  const auto cls = ReasonClass::budget;
  stop_after_telling(fmt::format("site {} refuses: {}: {}", m_site, reason_class_name(cls), reason_class_text(cls)),
                     ExitCode::budget, {{"task", job.task}, {"round", job.round}, {"class", reason_class_name(cls)}});
}

void
Site::on_tick()
{
  const double now = FramedConnection::now();
  if (m_stop_when_closed && m_conn && m_conn->is_open() && m_conn->closing_since() > 0 &&
      now - m_conn->closing_since() > 5) {
    m_conn->close("the coordinator did not take the last message in time");
  }
  if (m_busy_serial != 0 && m_busy_deadline > 0 && now > m_busy_deadline && !m_busy_past_deadline) {
    m_busy_past_deadline = true;
    if (cancel_job("the task's deadline has passed")) {
      m_busy_serial = 0;
      refuse(m_busy_task, m_busy_round, ReasonClass::internal, "the task's deadline passed before training began",
             true);
    }
  }
  // A coordinator that takes nothing of what waits for it is dropped (and connected again):
  // a peer that stops reading must not hold the site's memory.
  if (m_conn && m_conn->is_open() && m_conn->queued() > 0 && m_conn->closing_since() == 0) {
    const auto written = m_conn->stream().bytes_written();
    if (written != m_stall_bytes) {
      m_stall_bytes = written;
      m_stall_since = now;
    } else if (now - m_stall_since > std::max(m_dead_after, 5.0)) {
      m_conn->close(fmt::format("the coordinator took nothing of the {} frames waiting for it for {:.0f} s",
                                m_conn->queued(), now - m_stall_since));
    }
  } else {
    m_stall_since = now;
    m_stall_bytes = m_conn ? m_conn->stream().bytes_written() : 0;
  }
  if (m_conn && m_conn->is_open() && m_conn->ready()) {
    if (now - m_conn->last_received() > m_dead_after) {
      m_conn->close(fmt::format("nothing from the coordinator for {:.0f} s", now - m_conn->last_received()));
    } else if (m_conn->queued() == 0 && now - m_conn->last_sent() >= m_heartbeat) {
      m_conn->send(FrameType::heartbeat, json::object());
    }
  }
  m_tick.expires_after(std::chrono::milliseconds(200));
  m_tick.async_wait([this](const std::error_code& ec) {
    if (!ec) {
      on_tick();
    }
  });
}

json
Site::run()
{
  m_identity = read_identity(m_s.bundle / "client.crt", m_s.bundle / "client.key");
  const auto ca = read_certificate(m_s.bundle / "ca.crt");
  const auto info = certificate_info(m_identity.cert);
  m_site = info.common_name;
  m_ca_fingerprint = certificate_fingerprint(ca);
  try {
    m_receipts.emplace(m_s.bundle / "receipts.jsonl");
  } catch (const Error& e) {
    FEDL_LOG_WARN("{}; this site keeps no receipts of the coordinator's ledger this time (move the file away to "
                  "start a new one)",
                  e.what());
  }
  try {
    m_account = SiteAccount::open(m_s.bundle / "privacy.jsonl", m_identity);
  } catch (const VerifyError& e) {
    if (m_s.max_epsilon) {
      throw;
    }
    FEDL_LOG_WARN("{}; without --max-epsilon this site goes on, but keeps no account of its DP-SGD runs", e.what());
  }
  if (m_s.max_epsilon) {
    const auto spent = m_account->spent().epsilon(m_s.delta).epsilon;
    if (spent >= *m_s.max_epsilon) {
      throw Error(ExitCode::budget,
                  "site {} has spent its privacy budget: epsilon {:.4g} of --max-epsilon {:g} at delta {:g} ({} DP-SGD "
                  "runs in {})",
                  m_site, spent, *m_s.max_epsilon, m_s.delta, m_account->runs(),
                  (m_s.bundle / "privacy.jsonl").string());
    }
    FEDL_LOG_INFO("privacy account {}: epsilon {:.4g} of {:g} spent at delta {:g} ({} runs)",
                  (m_s.bundle / "privacy.jsonl").string(), spent, *m_s.max_epsilon, m_s.delta, m_account->runs());
  }
  m_tls = TlsContext::client(m_identity, ca, m_s.server_name);
  m_signals.async_wait([this](const std::error_code& ec, int sig) {
    if (!ec) {
      FEDL_LOG_WARN("{}: leaving the federation", sig == SIGINT ? "interrupted" : "terminated");
      stop("interrupted");
    }
  });
  m_trainer = std::thread([this] { trainer_loop(); });
  FEDL_LOG_INFO("site {} joining {} (server name {})", m_site, m_s.server.to_string(), m_s.server_name);
  connect();
  on_tick();
  m_io.run();
  stop_trainer();
  if (!m_fatal.empty()) {
    throw Error(m_fatal_code, "{}", m_fatal);
  }
  return {{"site", m_site},
          {"rounds_trained", m_rounds_trained},
          {"last_round", m_last_round},
          {"reason", m_reason},
          {"interrupted", m_reason == "interrupted"}};
}

} // namespace

json
run_site(const JoinSettings& settings)
{
  // A peer that resets its connection while OpenSSL writes to it (with write(2)) must be a send
  // error on that connection, not the death of this process by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  Site site(settings);
  return site.run();
}

} // namespace fedl::core
