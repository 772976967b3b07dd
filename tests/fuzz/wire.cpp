// SPDX-License-Identifier: Apache-2.0
// Fuzz target "wire": the JSON headers of the frames that the coordinator and a site receive,
// read the way they read them. The input is one selector byte (which receiver and frame type,
// below) and a frame header's text. The text goes through decode_header (core/net/frame.hpp) as
// FramedConnection hands it over; then through the decoder of that frame's message
// (core/net/site_protocol.hpp for serve <-> join, core/net/trainer_protocol.hpp for the trainer's
// reply) and what the receiver does with the fields: bounded_metrics, SiteSpending::from_json
// (core/privacy/privacy.hpp) for a welcome's privacy record, parse_receipt for the ledger head of
// a task or done frame (core/trust/receipt.hpp), valid_utf8 / escape_controls / quote_text for
// the peer text the coordinator keeps (core/util/text.hpp), and training_from_json for a task's
// "training" (core/config/config.hpp). Secure aggregation's headers (core/net/secagg_protocol.hpp,
// not sent by any command yet) go through their decoders with a receiver's bounds, and the setup
// through the protocol's own checks.
//
// What a receiver may throw: ProtocolError (decode_header, the decoders) and
// nlohmann::json::exception where FramedConnection catches them (on_head and on_frame: the
// connection closes with a protocol error); core::Error and std::exception where the handler
// catches them (check_coordinator_record, the task's checks, on_trained).
#include "fuzz.hpp"

#include "core/config/config.hpp"
#include "core/net/frame.hpp"
#include "core/net/secagg_protocol.hpp"
#include "core/net/site_protocol.hpp"
#include "core/net/trainer_protocol.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/receipt.hpp"
#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <algorithm>

using namespace fedl;
using nlohmann::json;

namespace {

enum class Receiver : std::uint8_t
{
  coordinator_hello,  // coordinator.cpp on_hello
  coordinator_update, // coordinator.cpp on_head, then on_update
  coordinator_error,  // coordinator.cpp on_frame, FrameType::error
  site_welcome,       // session.cpp on_frame, FrameType::welcome, with check_coordinator_record
  site_task,          // session.cpp on_frame, FrameType::task, then the trainer thread
  site_done,          // session.cpp on_frame, FrameType::done
  site_error,         // session.cpp on_frame, FrameType::error
  site_trainer_reply, // session.cpp on_trained: the trainer child's update or error frame
  // Secure aggregation's stages, with the bounds a receiver of an attempt of 64 sites uses.
  coordinator_secagg_keys,
  site_secagg_peers,
  secagg_shares,
  coordinator_secagg_input,
  site_secagg_unmask,
  coordinator_secagg_reveal,
  site_secagg_setup,
  coordinator_secagg_signature,
  count
};

constexpr std::size_t secagg_sites = 64;

// A site's max-epsilon delta, for the epsilon of an account it reads.
constexpr double site_delta = 1e-5;

// Peer text as the coordinator keeps it (core/util/text.hpp): valid UTF-8 of at most `max` bytes.
std::string
bounded_text(const std::string& s, std::size_t max)
{
  auto t = core::valid_utf8(s, max);
  FEDL_FUZZ_CHECK(t.size() <= max && fuzz::is_utf8(t));
  FEDL_FUZZ_CHECK(fuzz::is_utf8(core::escape_controls(t)));
  FEDL_FUZZ_CHECK(fuzz::is_utf8(core::quote_text(s)));
  return t;
}

void
coordinator_hello(const json& header)
{
  (void)bounded_text(core::Hello::from_header(header).site, 64);
}

void
coordinator_update(const json& header)
{
  // on_head, then on_update: the metrics go into the round's ledger entry.
  const auto update = core::Update::from_header(header);
  const auto metrics = core::bounded_metrics(update.metrics);
  FEDL_FUZZ_CHECK(metrics.is_object() && metrics.size() <= 32);
  for (const auto& [key, value] : metrics.items()) {
    FEDL_FUZZ_CHECK(key.size() <= 64);
    FEDL_FUZZ_CHECK(!value.is_string() ||
                    (value.get<std::string>().size() <= 200 && fuzz::is_utf8(value.get<std::string>())));
  }
  (void)metrics.dump();
}

void
coordinator_error(const json& header)
{
  (void)bounded_text(core::ErrorReport::from_header(header).message, 500);
}

// session.cpp's keep_receipt, up to the signature check (the coordinator's certificate is not
// at hand here).
void
keep_receipt(const json& ledger_head)
{
  if (ledger_head.is_null()) {
    return;
  }
  if (const auto r = core::parse_receipt(ledger_head)) {
    FEDL_FUZZ_CHECK(r->sha256.size() == 64 && r->ca.size() == 64 && r->sig.size() <= 200);
    (void)core::receipt_payload(r->seq, r->sha256, r->ca);
  }
}

void
site_welcome(const json& header)
{
  const auto welcome = core::Welcome::from_header(header);
  const double heartbeat = std::clamp(welcome.heartbeat, 0.1, 3600.0);
  FEDL_FUZZ_CHECK(heartbeat >= 0.1 && heartbeat <= 3600.0);
  // check_coordinator_record (with --max-epsilon), which catches std::exception around the read.
  if (welcome.privacy.is_null()) {
    return;
  }
  core::SiteSpending record;
  try {
    record = core::SiteSpending::from_json(welcome.privacy, "the coordinator's record of this site's privacy spending");
  } catch (const std::exception& e) {
    fuzz::refused(e);
    return;
  }
  FEDL_FUZZ_CHECK(record.spent.epsilon(site_delta, core::Accountant::rdp_v2).epsilon >= 0);
}

void
site_task(const json& header)
{
  const auto task = core::Task::from_header(header);
  keep_receipt(task.ledger_head);
  // on_task's checks, in a try that catches std::exception (the task is refused).
  try {
    const auto training = core::training_from_json(task.training, "the task");
    core::check_training(training);
    (void)core::frame_head(core::FrameType::task,
                           core::TrainTask{task.round, task.seed, training, task.base_sha256, {}}.to_header(), 0);
  } catch (const std::exception& e) {
    fuzz::refused(e);
  }
}

void
site_done(const json& header)
{
  keep_receipt(core::Done::from_header(header).ledger_head);
}

void
site_error(const json& header)
{
  (void)core::ErrorReport::from_header(header);
}

// on_trained, all in a try that catches std::exception (a failed task); the reply's type is the
// low bit of the selector's high nibble.
void
site_trainer_reply(const json& header, bool is_update)
{
  try {
    if (!is_update) {
      (void)bounded_text(core::ChildError::from_header(header).message, 500);
      return;
    }
    const auto result = core::TrainResult::from_header(header);
    if (result.dp) {
      const auto report =
        core::DpSgdReport::from_json(*result.dp, "the trainer's DP-SGD report", core::Accountant::rdp_v2);
      FEDL_FUZZ_CHECK(report.epsilon >= 0);
    }
  } catch (const std::exception& e) {
    fuzz::refused(e);
  }
}

void
secagg(Receiver receiver, const json& header)
{
  switch (receiver) {
  case Receiver::coordinator_secagg_keys: {
    const auto k = core::SecAggKeys::from_header(header);
    FEDL_FUZZ_CHECK(k.advert.index >= 1 && k.advert.signature.size() <= 256);
    break;
  }
  case Receiver::site_secagg_peers: {
    const auto p = core::SecAggPeers::from_header(header, secagg_sites - 1);
    FEDL_FUZZ_CHECK(p.peers.size() < secagg_sites);
    for (const auto& peer : p.peers) {
      FEDL_FUZZ_CHECK(peer.certificate.size() <= 16 * 1024);
    }
    break;
  }
  case Receiver::secagg_shares: {
    const auto s = core::SecAggShares::from_header(header, secagg_sites - 1);
    for (const auto& share : s.shares) {
      FEDL_FUZZ_CHECK(share.sealed.size() == core::secagg::sealed_share_bytes);
    }
    break;
  }
  case Receiver::coordinator_secagg_input: {
    const auto in = core::SecAggInput::from_header(header);
    FEDL_FUZZ_CHECK(in.signature.size() <= 256);
    break;
  }
  case Receiver::site_secagg_unmask: {
    const auto u = core::SecAggUnmask::from_header(header, secagg_sites);
    FEDL_FUZZ_CHECK(u.survivors.size() <= secagg_sites && u.signatures.size() <= secagg_sites);
    // The same bytes as the signers' certificates, the body that comes with the signatures.
    const auto text = header.dump();
    try {
      const auto certs = core::secagg_certificates_from_body(core::as_bytes(text), secagg_sites);
      FEDL_FUZZ_CHECK(certs.size() <= secagg_sites);
      for (const auto& [index, pem] : certs) {
        FEDL_FUZZ_CHECK(index >= 1 && pem.size() <= 16 * 1024);
      }
    } catch (const core::ProtocolError& e) {
      fuzz::refused(e);
    }
    break;
  }
  case Receiver::coordinator_secagg_signature:
    FEDL_FUZZ_CHECK(core::SecAggSignature::from_header(header).signature.signature.size() <= 256);
    break;
  case Receiver::coordinator_secagg_reveal: {
    const auto r = core::SecAggReveal::from_header(header, secagg_sites - 1);
    FEDL_FUZZ_CHECK(r.reveal.seeds.size() + r.reveal.keys.size() < secagg_sites);
    for (const auto* list : {&r.reveal.seeds, &r.reveal.keys}) {
      for (const auto& s : *list) {
        FEDL_FUZZ_CHECK(s.share.y.size() == core::secagg::secret_limbs);
      }
    }
    break;
  }
  case Receiver::site_secagg_setup: {
    const auto setup = core::SecAggSetup::from_json(header);
    FEDL_FUZZ_CHECK(setup.index >= 1 && setup.index <= setup.sites.size());
    // The site checks the numbers before it makes keys (core::UsageError if they are not valid).
    try {
      (void)setup.params(1, 1);
      (void)setup.encoding();
    } catch (const core::Error& e) {
      fuzz::refused(e);
    }
    break;
  }
  default:
    break;
  }
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  if (size < 1) {
    return 0;
  }
  const auto receiver = static_cast<Receiver>((data[0] & 0x0f) % static_cast<std::uint8_t>(Receiver::count));
  const auto text = fuzz::as_text({data + 1, size - 1});
  json header;
  try {
    header = core::decode_header(text);
  } catch (const core::ProtocolError& e) {
    fuzz::refused(e);
    return 0;
  }
  FEDL_FUZZ_CHECK(header.is_object());
  if (receiver == Receiver::site_trainer_reply) {
    site_trainer_reply(header, (data[0] & 0x10) == 0);
    return 0;
  }
  try {
    switch (receiver) {
    case Receiver::coordinator_hello:
      coordinator_hello(header);
      break;
    case Receiver::coordinator_update:
      coordinator_update(header);
      break;
    case Receiver::coordinator_error:
      coordinator_error(header);
      break;
    case Receiver::site_welcome:
      site_welcome(header);
      break;
    case Receiver::site_task:
      site_task(header);
      break;
    case Receiver::site_done:
      site_done(header);
      break;
    case Receiver::site_error:
      site_error(header);
      break;
    default:
      secagg(receiver, header);
      break;
    }
  } catch (const nlohmann::json::exception& e) {
    // FramedConnection::bad_header: the connection closes with a protocol error.
    fuzz::refused(e);
  } catch (const core::ProtocolError& e) {
    fuzz::refused(e); // the same
  }
  return 0;
}
