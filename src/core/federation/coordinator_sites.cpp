// SPDX-License-Identifier: Apache-2.0
// The coordinator's side of each site's connection: a TLS connection from the pool, its hello,
// its uploads into state/incoming/, its error reports and its end (coordinator_detail.hpp).
#include "core/federation/coordinator_detail.hpp"
#include "core/math/metrics.hpp"

#include "core/net/site_protocol.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::core::serve_detail {

// A new connection within the pool's bounds: its TLS stream, frame limits and callbacks.
std::shared_ptr<PooledPeer>
Coordinator::make_peer(tcp::socket socket)
{
  refresh_trust(); // so that its handshake sees the current CRL
  auto p = std::make_shared<Peer>();
  std::weak_ptr<Peer> weak = p;
  FrameLimits limits;
  limits.allow(FrameType::hello)
    .allow(FrameType::heartbeat)
    .allow(FrameType::error)
    .allow(FrameType::update, m_max_update);
  if (m_s.secure_aggregation) {
    limits.allow(FrameType::secagg_keys)
      .allow(FrameType::secagg_shares)
      .allow(FrameType::secagg_input, m_max_update)
      .allow(FrameType::secagg_signature)
      .allow(FrameType::secagg_reveal);
  }
  FramedConnection::Callbacks cb;
  cb.on_ready = [this, weak] {
    if (auto peer = weak.lock()) {
      on_ready(peer);
    }
  };
  cb.on_head = [this, weak](const FramePrefix& prefix, const json& header) {
    auto peer = weak.lock();
    return peer ? on_head(peer, prefix, header) : FramedConnection::BodySink{};
  };
  cb.on_frame = [this, weak](FrameType type, json& header, const FramedConnection::BodySink& sink) {
    if (auto peer = weak.lock()) {
      on_frame(peer, type, header, sink);
    }
  };
  cb.on_close = [this, weak](const std::string& reason) {
    if (auto peer = weak.lock()) {
      on_close(peer, reason);
    }
  };
  p->conn = std::make_shared<FramedConnection>(std::make_unique<TlsStream>(std::move(socket), m_tls), limits, cb);
  return p;
}

void
Coordinator::on_ready(const std::shared_ptr<Peer>& p)
{
  p->cert = p->conn->stream().peer_certificate();
  if (!p->cert) {
    p->conn->close("no client certificate");
    return;
  }
  CertificateInfo info;
  try {
    info = certificate_info(p->cert);
  } catch (const Error& e) {
    p->conn->send_error_and_close(fmt::format("the client certificate cannot be read: {}", e.what()), 3);
    return;
  }
  p->site = info.common_name;
  p->fingerprint = info.fingerprint;
  if (!m_trust->enrolled(p->site)) {
    m_pool->count_refusal();
    p->conn->send_error_and_close(
      fmt::format("site {} is not a client of this federation (add it with fedl init WS --add-client {})", p->site,
                  p->site),
      3);
  }
}

FramedConnection::BodySink
Coordinator::on_head(const std::shared_ptr<Peer>& p, const FramePrefix& prefix, const json& header)
{
  if (prefix.type == FrameType::secagg_input && p->admitted) {
    return on_secure_input_head(p, prefix, header);
  }
  if (prefix.type != FrameType::update || !p->admitted) {
    p->conn->send_error_and_close(fmt::format("protocol error: a {} frame with a body{}", frame_type_name(prefix.type),
                                              p->admitted ? "" : " before hello"),
                                  1);
    return {};
  }
  const auto update = Update::from_header(header);
  const auto task = update.task;
  const auto round = update.round;
  if (const auto refusal = m_rounds.check_upload(p->site, task, round)) {
    // Bounded: a site that keeps sending updates nobody asked for is disconnected rather than
    // allowed to fill the log.
    if (++p->unexpected > max_unexpected_updates) {
      p->conn->send_error_and_close("protocol error: too many updates that answer no task", 1);
      return {};
    }
    m_rounds.refuse_upload(p->site, task, round, *refusal);
    return {};
  }
  if (const auto refusal = m_s.sandbox_refusal(update.sandbox)) {
    FEDL_LOG_WARN("round {}: update from {} refused: {}", round, p->site, *refusal);
    m_rounds.upload_lost(p->site, *refusal);
    return {};
  }
  open_part(*p);
  if (!p->fd) {
    // The coordinator's problem (descriptors, disk), not the site's: this update is lost and the
    // site recorded as dropped; the round goes on with the others.
    FEDL_LOG_ERROR("cannot store the update of {} in {}: {}", p->site, p->part.string(), std::strerror(errno));
    m_rounds.upload_lost(p->site, fmt::format("the coordinator could not store its update: {}", std::strerror(errno)));
    return {};
  }
  p->digester = std::make_shared<UpdateDigester>();
  return {nullptr, p->fd.get(), [d = p->digester](std::span<const std::byte> bytes) { d->update(bytes); }};
}

void
Coordinator::open_part(Peer& p)
{
  // A slot is written over from its start and cut to the body's length at its end (on_update):
  // its pages are already in the page cache, and writing over them costs a copy where fresh
  // ones cost an allocation and a zeroing each (measured: 10 bodies of 40 MB in 38 ms over a
  // slot, 77-900 ms into new files on this VM).
  while (!m_free_slots.empty()) {
    p.part = std::move(m_free_slots.back());
    m_free_slots.pop_back();
    p.fd.reset(::open(p.part.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW));
    if (p.fd) {
      return;
    }
  }
  p.part = m_ws.state() / "incoming" / fmt::format("slot-{}", m_slots_named++);
  p.fd.reset(::open(p.part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
}

void
Coordinator::discard_part(Peer& p)
{
  if (p.fd) {
    // The connection may still be receiving this body: it must stop writing to the descriptor
    // before the number can be reused by the next open() or accept().
    p.conn->drop_body();
    p.fd.reset();
    p.digester.reset();
    std::error_code ec;
    fs::remove(p.part, ec);
  }
}

void
Coordinator::on_frame(const std::shared_ptr<Peer>& p, FrameType type, json& header,
                      const FramedConnection::BodySink& sink)
{
  switch (type) {
  case FrameType::secagg_keys:
  case FrameType::secagg_shares:
  case FrameType::secagg_input:
  case FrameType::secagg_signature:
  case FrameType::secagg_reveal:
    if (!p->admitted) {
      p->conn->send_error_and_close("protocol error: secure aggregation before hello", 1);
      return;
    }
    on_secure_frame(p, type, header, sink);
    return;
  case FrameType::hello:
    on_hello(p, header);
    return;
  case FrameType::update:
    on_update(p, header);
    return;
  case FrameType::heartbeat:
    return;
  case FrameType::error: {
    // A site's words go into the log and the ledger: cut to a sane length.
    const auto report = ErrorReport::from_header(header);
    const auto message = valid_utf8(report.message, max_error_text);
    FEDL_LOG_WARN_FIELDS(nlohmann::json({{"event", "site-error"},
                                         {"site", p->site},
                                         {"task", report.task.value_or(0)},
                                         {"class", report.reason_class.empty() ? nlohmann::json(nullptr)
                                                                               : nlohmann::json(report.reason_class)}}),
                         "site {} reports: {}", p->site, message);
    m_rounds.site_error(p->site, report.task.value_or(0), message);
    if (m_secure && report.task == m_secure->task()) {
      m_secure->gone(p->site, message, FramedConnection::now());
      check_secure();
    }
    return;
  }
  default:
    p->conn->send_error_and_close(fmt::format("protocol error: unexpected {} frame", frame_type_name(type)), 1);
  }
}

void
Coordinator::on_hello(const std::shared_ptr<Peer>& p, const json& header)
{
  if (p->admitted) {
    p->conn->send_error_and_close("protocol error: hello sent twice", 1);
    return;
  }
  if (p->site.empty() || !p->conn->is_open()) {
    return;
  }
  const auto claimed = Hello::from_header(header).site;
  if (claimed != p->site) {
    p->conn->send_error_and_close(
      fmt::format("hello names site {} but the certificate is for {}", quote_text(claimed), p->site), 3);
    return;
  }
  if (const auto old = m_sites.find(p->site); old != m_sites.end()) {
    FEDL_LOG_INFO("site {} connected again from {}; closing its older connection", p->site, p->conn->stream().remote());
    auto previous = old->second;
    m_sites.erase(old);
    previous->admitted = false;
    previous->replaced = true;
    discard_part(*previous);
    previous->conn->send_error_and_close("replaced by a newer connection of the same site", 1, {{"replaced", true}});
  }
  p->admitted = true;
  m_sites[p->site] = p;
  FEDL_LOG_INFO("site {} connected from {} ({} connected)", p->site, p->conn->stream().remote(), m_sites.size());
  // With what the ledger says this site spent: a site with a budget counts the larger of this and
  // its own account, and refuses to go on if its account is missing or shorter.
  const Welcome welcome{m_rounds.round(),
                        m_s.rounds,
                        m_s.heartbeat,
                        certificate_fingerprint(m_trust->ca()),
                        m_rounds.privacy().site_report(p->site),
                        update_signature_latest};
  p->conn->send(FrameType::welcome, welcome.to_header());
  // The machine sends its task again to a participant that reconnects mid-round.
  m_rounds.site_joined(p->site);
}

void
Coordinator::on_update(const std::shared_ptr<Peer>& p, const json& header)
{
  if (!p->fd) {
    return; // dropped in on_head, already logged
  }
  // A slot may hold a longer body of an earlier round beyond this one's end.
  const auto length = ::lseek(p->fd.get(), 0, SEEK_CUR);
  if (length < 0 || ::ftruncate(p->fd.get(), length) != 0) {
    const std::string why = std::strerror(errno);
    discard_part(*p);
    FEDL_LOG_ERROR("cannot store the update of {}: {}", p->site, why);
    m_rounds.upload_lost(p->site, fmt::format("the coordinator could not store its update: {}", why));
    return;
  }
  p->fd.reset();
  auto digest = std::exchange(p->digester, nullptr)->finish();
  const auto file = p->part.parent_path() / fmt::format("round-{:06}-{}.safetensors", m_rounds.round(), p->site);
  std::error_code ec;
  fs::rename(p->part, file, ec);
  if (ec) {
    fail(fmt::format("cannot store an update as {}: {}", file.string(), ec.message()));
    return;
  }
  FEDL_LOG_DEBUG("round {}: update from {} ({} bytes)", m_rounds.round(), p->site, fs::file_size(file, ec));
  const auto update = Update::from_header(header);
  auto metrics = bounded_metrics(update.metrics);
  // A site's confusion matrix of its evaluation (join --metrics-set classification): kept only
  // if its counts fit the class count it names and add up to its samples.
  if (const auto it = update.metrics.find("eval_confusion"); it != update.metrics.end()) {
    try {
      const auto classes = metrics.value("eval_classes", json());
      const auto samples = metrics.value("eval_samples", json());
      if (!classes.is_number_integer() || classes.get<std::int64_t>() != m_s.classes ||
          classes.get<std::int64_t>() > max_site_eval_classes || !samples.is_number_unsigned()) {
        throw Error("it is not for the model's {} classes, or names no sample count", m_s.classes);
      }
      (void)ClassificationCounts::from_counts({{"classes", classes}, {"confusion", *it}}, samples.get<std::uint64_t>(),
                                              "its evaluation");
      metrics["eval_confusion"] = *it;
    } catch (const Error& e) {
      FEDL_LOG_WARN("round {}: site {}'s confusion matrix is left out: {}", m_rounds.round(), p->site, e.what());
    }
  }
  if (update.sandbox) {
    metrics["sandbox"] = sandbox_level_name(*update.sandbox); // recorded in the round's ledger entry
  }
  if (update.model_policy) {
    metrics["model_policy"] = model_policy_name(*update.model_policy);
  }
  m_rounds.upload_received(p->site, file, std::move(metrics), std::move(digest));
}

void
Coordinator::on_close(const std::shared_ptr<Peer>& p, const std::string& reason)
{
  discard_part(*p);
  m_pool->closed(*p);
  if (!p->conn->ready() || (!p->admitted && p->site.empty())) {
    m_pool->refuse(FramedConnection::now(),
                   fmt::format("refused a connection from {}: {}", p->conn->stream().remote(), reason));
    return;
  }
  if (!p->admitted) {
    if (m_rounds.phase() != Phase::stopped && !p->replaced && !p->removed) {
      FEDL_LOG_WARN("connection from {} ({}) closed before it was admitted: {}", p->conn->stream().remote(), p->site,
                    reason);
    }
    return;
  }
  p->admitted = false;
  const auto it = m_sites.find(p->site);
  if (it == m_sites.end() || it->second != p) {
    return;
  }
  m_sites.erase(it);
  m_rounds.site_left(p->site, reason);
  if (m_secure) {
    // A secure attempt cannot wait for a site to come back: its keys went with its process.
    m_secure->gone(p->site, fmt::format("disconnected: {}", reason), FramedConnection::now());
    check_secure();
  }
}

} // namespace fedl::core::serve_detail
