// SPDX-License-Identifier: Apache-2.0
// The site's trainer thread (one job at a time, handed to the trainer child over a pipe), the
// signing of its updates with the site's key, and the site's privacy budget.
#include "core/federation/site.hpp"

#include "core/net/child.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <asio/post.hpp>
#include <fmt/format.h>

#include <csignal>

namespace fedl::core::join_detail {

void
check_update_tensors(const TensorListing& model, const Safetensors& update)
{
  if (const auto why = listing_difference(model, tensor_listing(update)); !why.empty()) {
    throw Error("the trainer's update does not hold exactly the model's tensors (names, dtypes and shapes): {}", why);
  }
}

std::shared_ptr<SignedUpdate>
Site::sign(std::vector<std::byte> bytes, const TensorListing& model)
{
  auto u = std::make_shared<SignedUpdate>();
  u->bytes = std::move(bytes);
  u->parsed = parse_safetensors(u->bytes, "the trainer's update");
  check_update_tensors(model, u->parsed);
  auto& meta = u->parsed.metadata;
  sign_update(u->parsed.tensors, meta, m_identity, m_update_signature);
  u->header = safetensors_header(serialize_order(u->parsed.tensors), meta);
  return u;
}

namespace {

// What an update tells the coordinator of its training run (and of the site's evaluation).
json
update_metrics(const TrainResult& result)
{
  json metrics = {{"num_samples", result.num_samples}, {"steps", result.steps}, {"seconds", result.seconds}};
  // Absent under DP-SGD: the trainer keeps the loss of private data to itself.
  if (result.loss) {
    metrics["loss"] = *result.loss;
  }
  // The global model on the site's validation data (join --eval-data), pooled by the
  // coordinator. Figures of data that is not trained on, which the site chose to report.
  if (result.evaluation) {
    metrics["eval_accuracy"] = result.evaluation->accuracy;
    metrics["eval_loss"] = result.evaluation->loss;
    metrics["eval_samples"] = result.evaluation->samples;
    if (const auto& c = result.evaluation->classification) {
      const auto counts = c->to_counts();
      metrics["eval_classes"] = c->classes();
      metrics["eval_confusion"] = counts["confusion"];
      if (counts["roc_auc"].is_number()) {
        metrics["eval_roc_auc"] = counts["roc_auc"];
      }
    }
  }
  return metrics;
}

} // namespace

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
      trainer_failed(job, failure ? failure->cls : ReasonClass::internal,
                     failure ? failure->text : std::string("the trainer did not answer"), failure && failure->tell);
      return;
    }
    m_failed_in_a_row = 0;
    metrics = update_metrics(*result);
    if (m_account && result->dp) {
      const auto report = DpSgdReport::from_json(*result->dp, "the trainer's DP-SGD report", m_s.accountant);
      if (m_s.max_epsilon) {
        // Checked again now, as one step with the append and the send: the budget the trainer
        // was given may predate an update sent since.
        auto after = budget_spent();
        const double before = after.epsilon(m_s.delta, m_s.accountant).epsilon;
        report.add_to(after);
        const double eps = after.epsilon(m_s.delta, m_s.accountant).epsilon;
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
        m_account->append(report, {{"round", job.round}, {"task", job.task}, {"server", m_s.server.to_string()}},
                          m_s.accountant);
      }
      if (m_s.max_epsilon) {
        FEDL_LOG_INFO("round {}: privacy account: epsilon {:.4g} of {:g} at delta {:g}", job.round,
                      budget_spent().epsilon(m_s.delta, m_s.accountant).epsilon, *m_s.max_epsilon, m_s.delta);
      }
    } else if (m_s.max_epsilon) {
      throw Error("the trainer sent no DP-SGD report for a task under this site's budget");
    }
    if (job.secure) {
      if (m_secure && m_secure->task == job.task) {
        secure_trained(job, *result, body);
      }
      return; // an update asked for under secure aggregation leaves masked or not at all
    }
    u = sign(std::move(body), job.tensors);
  } catch (const std::exception& e) {
    refuse(job.task, job.round, ReasonClass::internal, e.what(), false);
    return;
  }
  // The update it replaces is no longer asked for: its buffer takes the next one from the trainer
  // unless an upload still holds it.
  if (m_last_sent && m_last_sent->update.use_count() == 1) {
    const std::lock_guard lock(m_mutex);
    m_spare_update = std::move(m_last_sent->update->bytes);
  }
  m_last_sent = SentUpdate{job.task, job.round, metrics, u};
  send_update(*m_last_sent, job.attempt);
  count_trained(job.round);
  auto fields = metrics;
  fields["event"] = "update-sent";
  fields["round"] = job.round;
  fields["site"] = m_site;
  FEDL_LOG_INFO_FIELDS(
    fields, "round {}: update sent ({}{}, {:.1f} s)", job.round,
    metrics.contains("loss") ? fmt::format("loss {:.4f}, ", metrics["loss"].get<double>()) : std::string(),
    count_of(metrics["num_samples"].get<std::uint64_t>(), "sample"), metrics["seconds"].get<double>());
}

// A task's update has left (in clear or masked): no task of an earlier round is taken any more.
void
Site::count_trained(std::uint64_t round)
{
  m_round_floor = std::max(m_round_floor, round);
  ++m_rounds_trained;
  m_last_round = round;
}

// The trainer thread: owns the trainer child, started with the first task and restarted if it
// dies, and runs one task at a time.
void
Site::trainer_loop()
{
  TrainerClient trainer(m_s.trainer_argv, m_s.fork_server);
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
      std::vector<std::byte> reuse;
      {
        const std::lock_guard lock(m_mutex);
        reuse = std::move(m_spare_update);
      }
      auto answer = trainer.train(
        task, *job.model, max_update, [&] { give_back(std::move(job.model)); }, std::move(reuse));
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
    give_back(std::move(job.model));
    asio::post(m_io, [this, job = std::move(job), result, body = std::move(body), failure]() mutable {
      on_trained(job, result, std::move(body), failure);
    });
  }
}

// A task's model buffer, done with, for the next task's body (session.cpp on_head) unless
// something else still holds it.
void
Site::give_back(std::shared_ptr<std::vector<std::byte>> model)
{
  if (model && model.use_count() == 1) {
    const std::lock_guard lock(m_mutex);
    m_spare_model = std::move(model);
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

PrivacyAccount
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
  SiteSpending spending;
  try {
    spending = SiteSpending::from_json(report, "the coordinator's record of this site's privacy spending");
  } catch (const std::exception& e) {
    FEDL_LOG_WARN("{}; ignoring it", e.what());
    return;
  }
  const auto& record = spending.spent;
  const auto runs = spending.runs;
  const double theirs = record.epsilon(m_s.delta, m_s.accountant).epsilon;
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
  const double ours = m_account->spent().epsilon(m_s.delta, m_s.accountant).epsilon;
  if (theirs > ours) {
    FEDL_LOG_WARN("the coordinator's ledger says this site spent epsilon {:.4g}, more than its own account's {:.4g}; "
                  "counting the larger",
                  theirs, ours);
  }
}

void
Site::trainer_failed(const Job& job, ReasonClass cls, const std::string& detail, bool tell_detail)
{
  m_failed_in_a_row = detail == m_last_failure ? m_failed_in_a_row + 1 : 1;
  m_last_failure = detail;
  if (m_s.max_failures == 0 || m_failed_in_a_row < m_s.max_failures) {
    refuse(job.task, job.round, cls, detail, tell_detail);
    return;
  }
  // The same failure every time: another task would fail again. The coordinator learns the class
  // (and the detail only where it is about the task alone); this site's log and exit say it all.
  FEDL_LOG_ERROR("round {}: the trainer failed {} in a row: {}", job.round, count_of(m_failed_in_a_row, "task"),
                 detail);
  const auto said = tell_detail ? detail : std::string(reason_class_text(cls));
  stop_after_telling(fmt::format("site {} stops: its trainer failed {} in a row the same way ({}: {})", m_site,
                                 count_of(m_failed_in_a_row, "task"), reason_class_name(cls), said),
                     ExitCode::failure, {{"task", job.task}, {"round", job.round}, {"class", reason_class_name(cls)}});
  m_fatal = fmt::format("the trainer failed {} in a row the same way, so the site stops (--max-failures {}): {}",
                        count_of(m_failed_in_a_row, "task"), m_s.max_failures, detail);
}

void
Site::stop_for_budget(const Job& job)
{
  const auto cls = ReasonClass::budget;
  stop_after_telling(fmt::format("site {} refuses: {}: {}", m_site, reason_class_name(cls), reason_class_text(cls)),
                     ExitCode::budget, {{"task", job.task}, {"round", job.round}, {"class", reason_class_name(cls)}});
}

} // namespace fedl::core::join_detail
