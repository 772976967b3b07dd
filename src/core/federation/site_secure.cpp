// SPDX-License-Identifier: Apache-2.0
// The site's side of secure aggregation (site.hpp, SecureJob): it advertises its keys as soon as
// a task arrives (training goes on meanwhile), seals shares for the neighbours the coordinator
// relays (each checked against the federation's CA and the name the setup gives its index),
// encodes its update once trained (clipped to the DP clip norm under client-level DP), masks it
// once its neighbours' shares are in, signs the survivor list once, and reveals what the
// protocol allows. Anything malformed from the coordinator ends this site's part in the attempt,
// never the site.
#include "core/federation/site.hpp"

#include "core/trust/pki.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/log.hpp"

#include <fmt/format.h>

#include <bit>
#include <endian.h>

namespace fedl::core::join_detail {

bool
Site::start_secure(const Task& task, const Job& job)
{
  try {
    SecureJob s;
    s.task = job.task;
    s.round = job.round;
    s.setup = SecAggSetup::from_json(task.secure_aggregation);
    s.params = s.setup.params(job.round, task.attempt);
    (void)s.setup.encoding(); // checked now, used once trained
    if (s.params.sites.at(s.setup.index - 1) != m_site) {
      throw UsageError("it gives this site's index to {}", s.params.sites.at(s.setup.index - 1));
    }
    s.client = std::make_unique<secagg::Client>(s.params, s.setup.index, [this](std::span<const std::byte> payload) {
      return core::sign(m_identity.key, payload);
    });
    s.certs.emplace(s.setup.index, share_certificate(m_identity.cert));
    m_conn->send(FrameType::secagg_keys, SecAggKeys{s.task, s.client->advertise()}.to_header());
    m_secure = std::move(s);
    FEDL_LOG_DEBUG("round {}: secure aggregation, index {} of {}, threshold {}", job.round, m_secure->setup.index,
                   m_secure->params.sites.size(), m_secure->params.threshold);
    return true;
  } catch (const std::exception& e) {
    refuse(job.task, job.round, ReasonClass::bad_settings,
           fmt::format("the task's secure_aggregation cannot be used: {}", e.what()), true);
    return false;
  }
}

secagg::Verifier
Site::secure_verifier() const
{
  return [this](std::uint32_t index, std::span<const std::byte> payload, std::string_view signature) {
    const auto it = m_secure->certs.find(index);
    return it != m_secure->certs.end() && verify_signature(it->second, payload, signature);
  };
}

void
Site::abandon_secure(const std::string& why)
{
  if (!m_secure) {
    return;
  }
  const auto task = m_secure->task;
  const auto round = m_secure->round;
  m_secure.reset();
  if (m_busy_serial != 0 && m_busy_task == task) {
    cancel_job("it left the secure aggregation");
    m_busy_serial = 0;
  }
  refuse(task, round, ReasonClass::bad_settings, fmt::format("secure aggregation: {}", why), true);
}

namespace {

// A certificate the coordinator relays for `index`: issued by the federation's CA, to the site
// the setup gives that index. ProtocolAbort if not.
Cert
checked_peer_certificate(const std::string& pem, std::uint32_t index, const SecureJob& s, const Cert& ca)
{
  auto cert = certificate_from_pem(pem, "a peer's certificate");
  const auto verdict = verify_certificate(cert, ca, nullptr, CertPurpose::client);
  if (!verdict) {
    throw secagg::ProtocolAbort("the certificate of site {}: {}", index, verdict.reason);
  }
  if (index == 0 || index > s.params.sites.size() || certificate_info(cert).common_name != s.params.sites[index - 1]) {
    throw secagg::ProtocolAbort("the certificate given for index {} is not of the site the setup names", index);
  }
  return cert;
}

} // namespace

void
Site::on_secure_frame(FrameType type, const json& header, std::span<const std::byte> body)
{
  if (!m_secure || header_uint(header, "task") != m_secure->task) {
    FEDL_LOG_DEBUG("a {} frame for another task; ignored", frame_type_name(type));
    return;
  }
  auto& s = *m_secure;
  const std::size_t n = s.params.sites.size();
  try {
    switch (type) {
    case FrameType::secagg_peers: {
      const auto peers = SecAggPeers::from_header(header, n);
      std::vector<secagg::KeyAdvert> adverts;
      for (const auto& peer : peers.peers) {
        // A neighbour is who the federation's CA says it is, under the name the setup gives its index.
        s.certs.insert_or_assign(peer.advert.index,
                                 checked_peer_certificate(peer.certificate, peer.advert.index, s, m_ca));
        adverts.push_back(peer.advert);
      }
      auto sealed = s.client->share(adverts, secure_verifier());
      m_conn->send(FrameType::secagg_shares, SecAggShares{s.task, std::move(sealed)}.to_header());
      return;
    }
    case FrameType::secagg_shares: {
      if (s.received) {
        throw secagg::ProtocolAbort("shares relayed twice");
      }
      s.received = SecAggShares::from_header(header, n).shares;
      send_secure_input();
      return;
    }
    case FrameType::secagg_unmask: {
      const auto m = SecAggUnmask::from_header(header, n);
      const secagg::UnmaskRequest request{m.survivors};
      if (m.signatures.empty()) {
        const auto signature = s.client->agree(request);
        m_conn->send(FrameType::secagg_signature, SecAggSignature{s.task, signature}.to_header());
      } else {
        for (const auto& [index, pem] : secagg_certificates_from_body(body, n)) {
          if (s.certs.count(index) == 0) {
            s.certs.emplace(index, checked_peer_certificate(pem, index, s, m_ca));
          }
        }
        auto reveal = s.client->unmask(request, m.signatures, secure_verifier());
        m_conn->send(FrameType::secagg_reveal, SecAggReveal{s.task, std::move(reveal)}.to_header());
        FEDL_LOG_INFO("round {}: secure aggregation: this site's part is done", s.round);
      }
      return;
    }
    default:
      return;
    }
  } catch (const std::exception& e) {
    // A ProtocolAbort, a malformed frame, a certificate that does not check: out of this attempt.
    FEDL_LOG_WARN("round {}: leaving the secure aggregation: {}", s.round, e.what());
    abandon_secure(e.what());
  }
}

void
Site::secure_trained(const Job& job, const TrainResult& result, const std::vector<std::byte>& body)
{
  auto& s = *m_secure;
  const auto update = parse_safetensors(body, "the trainer's update");
  check_update_tensors(job.tensors, update);
  s.encoded = secagg::encode(update.tensors, result.num_samples, s.setup.encoding(), s.setup.clip_norm);
  if (result.dp) {
    s.dp = result.dp->dump();
  }
  FEDL_LOG_INFO("round {}: trained ({} samples, {:.1f} s); encoded for secure aggregation{}", job.round,
                result.num_samples, result.seconds,
                s.encoded->clipped > 0 ? fmt::format(", {} values clipped to ±{:g}", s.encoded->clipped, s.setup.range)
                                       : std::string());
  send_secure_input();
}

void
Site::send_secure_input()
{
  auto& s = *m_secure;
  if (!s.encoded || !s.received || s.input_sent) {
    return;
  }
  s.input_sent = true;
  try {
    const auto clipped = s.encoded->clipped;
    auto masked = s.client->mask(std::move(s.encoded->words), *s.received);
    s.encoded.reset();
    SecAggInput input;
    input.task = s.task;
    input.sandbox = m_s.sandbox;
    input.model_policy = m_s.model_policy;
    input.range = s.setup.range;
    input.max_samples = s.setup.max_samples;
    // The body: the masked words, little-endian (in place on a little-endian machine).
    auto words = std::make_shared<std::vector<std::uint32_t>>();
    if (const auto* complaint = std::get_if<secagg::Complaint>(&masked)) {
      input.complaint = complaint->about;
      FEDL_LOG_WARN("round {}: the shares of {} did not open; telling the coordinator", s.round,
                    s.params.sites[complaint->about - 1]);
    } else {
      *words = std::move(std::get<secagg::MaskedInput>(masked).masked);
      if constexpr (std::endian::native != std::endian::little) {
        for (auto& w : *words) {
          w = htole32(w);
        }
      }
      input.clipped = clipped;
      input.clip_norm = s.setup.clip_norm;
      input.dp = s.dp;
    }
    const auto body = std::as_bytes(std::span(*words));
    input.signature =
      core::sign(m_identity.key, secagg_input_payload(s.params, s.setup.index, sha256_hex(body), input));
    if (can_queue()) {
      m_conn->send(FrameType::secagg_input, input.to_header(), {body}, words);
      if (!input.complaint) {
        count_trained(s.round);
        FEDL_LOG_INFO("round {}: masked input sent", s.round);
      }
    }
  } catch (const std::exception& e) {
    FEDL_LOG_WARN("round {}: leaving the secure aggregation: {}", s.round, e.what());
    abandon_secure(e.what());
  }
}

} // namespace fedl::core::join_detail
