// SPDX-License-Identifier: Apache-2.0
// The coordinator's secure aggregation (coordinator_detail.hpp): one SecureRound per attempt,
// made with the attempt's first task, fed the sites' stage frames, and committed from the
// unmasked sum once the machine has closed the attempt and the last stages are over.
#include "core/federation/coordinator_detail.hpp"

#include "core/format/safetensors.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"

#include <asio/post.hpp>
#include <fmt/format.h>

#include <random>

namespace fedl::core::serve_detail {

namespace {

// The words a model's values take (and one for the weight); UsageError for a dtype the encoding
// does not take.
std::size_t
secure_length(std::span<const std::byte> model)
{
  const auto st = parse_safetensors(model, "the global model");
  std::size_t n = 1;
  for (const auto& t : st.tensors) {
    if (t.dtype != DType::f32 && t.dtype != DType::f64) {
      throw UsageError("secure aggregation encodes F32 and F64 values; tensor {} is {}", t.name, dtype_name(t.dtype));
    }
    n += t.numel();
  }
  return n;
}

} // namespace

SecureRound*
Coordinator::secure_round_for(const RoundTask& task)
{
  if (m_secure && m_secure->task() == task.task) {
    return &*m_secure;
  }
  if (m_secure_refused == task.task) {
    return nullptr; // tried for this attempt's first task, and said why
  }
  m_secure.reset();
  m_secure_close.reset();
  const auto names = m_rounds.participants();
  const auto& cfg = *m_s.secure_aggregation;
  try {
    const auto shape = secure_shape(cfg, names.size());
    secagg::Params p;
    p.round = task.round;
    p.attempt = task.attempt;
    p.sites = names;
    p.threshold = shape.threshold;
    p.neighbours = shape.neighbours;
    // The graph from the round's seed, as the sampling: a new one for each attempt.
    std::seed_seq seq{m_s.seed, task.round, std::uint64_t{task.attempt}, std::uint64_t{0x5ecA66}};
    p.graph_seed = std::mt19937_64(seq)();
    p.length = secure_length(m_model->bytes());
    SecureRound::Rules rules;
    const auto& dp = m_s.privacy;
    secagg::Encoding e{cfg.range, m_s.max_num_samples, names.size()};
    if (dp.noise_multiplier > 0) {
      // Each site clips to C itself; every update weighs 1, as client-level DP counts them.
      rules.clip_norm = dp.clip_norm;
      e.range = std::min(cfg.range, dp.clip_norm);
      e.max_samples = 1;
      if (cfg.distributed_dp) {
        e.noise = distributed_noise(dp, e, p.length - 1, std::max<std::size_t>(shape.threshold, m_s.min_clients));
      }
    }
    e.check();
    rules.stage_timeout = std::clamp(2 * m_s.dead_after, 5.0, m_s.round_timeout);
    rules.keys_timeout = m_s.round_timeout;
    rules.quorum = m_s.min_clients;
    rules.required_dp = m_s.training.dp;
    std::map<std::string, Cert> certs;
    for (const auto& name : names) {
      certs.emplace(name, share_certificate(m_sites.at(name)->cert));
    }
    m_secure.emplace(std::move(p), e, task.task, std::move(certs), rules, *this, FramedConnection::now());
    FEDL_LOG_INFO("round {}: secure aggregation over {} sites, threshold {}, {} neighbours each{}", task.round,
                  names.size(), shape.threshold, shape.neighbours,
                  e.noise > 0 ? fmt::format(", distributed DP (each site adds noise of {:.3g})", e.noise) : "");
  } catch (const Error& e) {
    FEDL_LOG_ERROR("round {}: secure aggregation cannot run this attempt: {}", task.round, e.what());
    m_secure_refused = task.task;
    for (const auto& name : names) {
      secure_drop(name, fmt::format("secure aggregation cannot run: {}", e.what()));
    }
    return nullptr;
  }
  return &*m_secure;
}

void
Coordinator::secure_send(const std::string& site, FrameType type, const json& header,
                         std::shared_ptr<const std::string> body)
{
  if (const auto it = m_sites.find(site); it != m_sites.end()) {
    if (body) {
      it->second->conn->send(type, header, {as_bytes(*body)}, body);
    } else {
      it->second->conn->send(type, header);
    }
  }
}

void
Coordinator::secure_drop(const std::string& site, const std::string& why)
{
  // Later, not from inside the SecureRound: the machine may close the attempt at once, which
  // reaches back into it.
  asio::post(m_io, [this, site, why, task = m_rounds.task()] {
    if (m_rounds.task() == task && m_rounds.phase() == Phase::running) {
      m_rounds.upload_lost(site, "secure aggregation: " + why);
    }
  });
}

FramedConnection::BodySink
Coordinator::on_secure_input_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header)
{
  const auto input = SecAggInput::from_header(header);
  std::optional<std::string> refusal;
  if (!m_secure || input.task != m_secure->task()) {
    refusal = "a masked input that answers no secure aggregation of this attempt";
  } else if (auto r = m_rounds.check_upload(p->site, input.task, m_rounds.round())) {
    refusal = r->why;
  } else if (auto weak = m_s.sandbox_refusal(input.sandbox)) {
    refusal = std::move(weak);
  } else {
    refusal = m_secure->check_input(p->site);
  }
  if (!refusal && prefix.body_size != m_secure->params().length * 4) {
    refusal = fmt::format("a masked input of {} bytes, not {}", prefix.body_size, m_secure->params().length * 4);
  }
  if (refusal) {
    FEDL_LOG_WARN("masked input from {} dropped: {}", p->site, *refusal);
    if (++p->unexpected > max_unexpected_updates) {
      p->conn->send_error_and_close("protocol error: too many inputs that answer no task", 1);
    }
    return {};
  }
  auto body = std::make_shared<std::vector<std::byte>>();
  body->reserve(prefix.body_size);
  return {std::move(body), -1};
}

void
Coordinator::on_secure_frame(const std::shared_ptr<Peer>& p, FrameType type, const json& header,
                             const FramedConnection::BodySink& sink)
{
  const auto task = header_uint(header, "task");
  if (!m_secure || task != m_secure->task()) {
    FEDL_LOG_DEBUG("{} frame from {} for another attempt; ignored", frame_type_name(type), p->site);
    return;
  }
  auto& secure = *m_secure;
  const double now = FramedConnection::now();
  const std::size_t n = secure.params().sites.size();
  switch (type) {
  case FrameType::secagg_keys:
    secure.keys(p->site, SecAggKeys::from_header(header), now);
    break;
  case FrameType::secagg_shares:
    secure.shares(p->site, SecAggShares::from_header(header, n), now);
    break;
  case FrameType::secagg_input: {
    const auto input = SecAggInput::from_header(header);
    if (!sink.memory && !input.complaint) {
      return; // refused at its head
    }
    const std::span<const std::byte> body =
      sink.memory ? std::span<const std::byte>(*sink.memory) : std::span<const std::byte>();
    if (secure.input(p->site, input, body)) {
      return; // dropped, and the machine told
    }
    m_rounds.upload_received(p->site, {}, json::object());
    break;
  }
  case FrameType::secagg_signature:
    secure.signature(p->site, SecAggSignature::from_header(header), now);
    break;
  case FrameType::secagg_reveal:
    secure.reveal(p->site, SecAggReveal::from_header(header, 2 * n), now);
    break;
  default:
    return;
  }
  check_secure();
}

void
Coordinator::check_secure()
{
  if (!m_secure) {
    return;
  }
  const auto stage = m_secure->stage();
  if (stage != SecureRound::Stage::done && stage != SecureRound::Stage::failed) {
    return;
  }
  if (!m_secure_close) {
    if (stage == SecureRound::Stage::failed && m_rounds.phase() == Phase::running &&
        m_rounds.task() == m_secure->task()) {
      // Failed before the inputs: nobody is waited for any longer.
      for (const auto& name : m_rounds.participants()) {
        secure_drop(name, m_secure->failure());
      }
    }
    return;
  }
  SecureSum sum;
  sum.words = m_secure->sum();
  sum.encoding = m_secure->encoding();
  sum.record = m_secure->record();
  sum.dp = m_secure->dp_reports();
  sum.failure = m_secure->failure();
  for (const auto& site : sum.record.at("survivors")) {
    const auto name = site.get<std::string>();
    sum.fingerprints[name] = m_secure->fingerprint(name);
  }
  auto attempt = std::move(*m_secure_close);
  m_secure_close.reset();
  commit_on_round_thread([this, attempt = std::move(attempt), sum = std::move(sum)] {
    return commit_secure_attempt(m_ws, attempt.round, sum, attempt_settings(m_s, m_evaluate, attempt), &m_ledger);
  });
}

} // namespace fedl::core::serve_detail
