// SPDX-License-Identifier: Apache-2.0
#include "core/federation/session.hpp"

#include "core/federation/site.hpp"

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

namespace join_detail {

namespace {

using tcp = asio::ip::tcp;

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

} // namespace

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
          .allow(FrameType::error)
          .allow(FrameType::secagg_peers)
          .allow(FrameType::secagg_shares)
          .allow(FrameType::secagg_unmask, SecureAggregationConfig::max_sites * 17 * 1024);
        FramedConnection::Callbacks cb;
        cb.on_ready = [this] { m_conn->send(FrameType::hello, Hello{m_site}.to_header()); };
        cb.on_head = [this](const FramePrefix& prefix, const json&) {
          // The last task's buffer, which the trainer thread gives back once its model is sent: a
          // model-sized body is otherwise mapped, faulted in and zeroed afresh every round
          // (glibc maps every block over 32 MB).
          std::shared_ptr<std::vector<std::byte>> buffer;
          if (prefix.type == FrameType::task) {
            const std::lock_guard lock(m_mutex);
            buffer = std::move(m_spare_model);
          }
          if (!buffer) {
            buffer = std::make_shared<std::vector<std::byte>>();
          }
          if (prefix.type == FrameType::secagg_unmask) {
            buffer->reserve(prefix.body_size); // bounded by the frame limit
          }
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
  m_secure.reset();
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
    m_update_signature = static_cast<int>(std::min<std::uint64_t>(welcome.update_signature, update_signature_latest));
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
  case FrameType::secagg_peers:
  case FrameType::secagg_shares:
  case FrameType::secagg_unmask:
    on_secure_frame(type, header,
                    sink.memory ? std::span<const std::byte>(*sink.memory) : std::span<const std::byte>());
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
    if (m_s.require_secure_aggregation && task.secure_aggregation.is_null()) {
      throw UsageError("the task asks for an update in clear, and this site's --require-secure-aggregation sends "
                       "one only under secure aggregation");
    }
    cls = ReasonClass::bad_model;
    part = "the task's model";
    const auto model = parse_safetensors(*job.model, part);
    if (m_s.contract) {
      check_task_model(*m_s.contract, model);
    }
    job.tensors = tensor_listing(model);
  } catch (const std::exception& e) {
    // About the coordinator's own task and this site's contract: the detail may go back.
    const std::string text = e.what();
    refuse(job.task, job.round, cls, text.starts_with(part) || text.starts_with("the task") ? text : part + ": " + text,
           true);
    return;
  }
  if (m_s.max_epsilon) {
    job.budget = json{{"max_epsilon", *m_s.max_epsilon},
                      {"delta", m_s.delta},
                      {"accountant", accountant_flag(m_s.accountant)},
                      {"spent", budget_spent().to_json()}};
  }
  m_secure.reset();
  job.secure = !task.secure_aggregation.is_null();
  if (job.secure && !start_secure(task, job)) {
    return;
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
  m_conn->send(FrameType::update,
               Update{sent.round, sent.task, attempt, sent.metrics, m_s.sandbox, m_s.model_policy}.to_header(),
               std::move(parts), sent.update);
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
  m_ca = read_certificate(m_s.bundle / "ca.crt");
  const auto& ca = m_ca;
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
    const auto spent = m_account->spent().epsilon(m_s.delta, m_s.accountant).epsilon;
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

} // namespace join_detail

nlohmann::json
run_site(const JoinSettings& settings)
{
  // A peer that resets its connection while OpenSSL writes to it (with write(2)) must be a send
  // error on that connection, not the death of this process by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  join_detail::Site site(settings);
  return site.run();
}

} // namespace fedl::core
