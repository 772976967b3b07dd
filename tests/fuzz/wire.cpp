// SPDX-License-Identifier: Apache-2.0
// Fuzz target "wire": the JSON headers of the frames that the coordinator and a site receive,
// read the way they read them. The input is one selector byte (which receiver and frame type,
// below) and a frame header's text. The text goes through decode_header (core/net/frame.hpp) as
// FramedConnection hands it over; then through the readers that the receiver calls on it:
// header_uint, header_int and header_number (core/net/frame.hpp), RdpAccount::from_json and
// DpSgdReport::from_json (core/privacy/privacy.hpp), parse_receipt for the ledger head of a task or done
// frame (core/trust/receipt.hpp), valid_utf8 and escape_controls for the peer text the coordinator
// keeps (core/util/text.hpp), and for a task's "training" object the TrainingConfig reader of
// fedl.json (config_from_json, core/config/config.hpp).
//
// The coordinator's and the site's handlers (on_head, on_frame, on_hello, on_update in
// coordinator.cpp; on_frame, check_coordinator_record, keep_receipt, the trainer thread and
// on_trained in session.cpp) are not functions one can call without a connection; their reads
// are repeated here one for one, with the same types and defaults, and the same exceptions
// caught. Keep them in step with those files.
//
// What a receiver may throw: ProtocolError (decode_header, the header_* readers) and
// nlohmann::json::exception where FramedConnection catches them (on_head and on_frame: the
// connection closes with a protocol error); core::Error and std::exception where the handler
// catches them (check_coordinator_record, the trainer thread, on_trained).
//
// Open bug (tests/fuzz/open/wire, tests/fuzz/README.md), stepped around at the one marked place
// so that fuzzing goes on past it (FEDL_FUZZ_OPEN=1 does not):
//   check_coordinator_record reads the welcome's privacy "runs" with value<std::uint64_t>(),
//   undefined behaviour for a float past 2^64 (its try/catch cannot help).
#include "fuzz.hpp"

#include "core/config/config.hpp"
#include "core/net/frame.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/receipt.hpp"
#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <algorithm>

using namespace fedl;
using core::header_int;
using core::header_number;
using core::header_uint;
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
  count
};

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

// coordinator.cpp's bounded_metrics (file-local there).
json
bounded_metrics(const json& metrics)
{
  json out = json::object();
  if (!metrics.is_object()) {
    return out;
  }
  for (const auto& [key, v] : metrics.items()) {
    if (out.size() >= 32) {
      break;
    }
    if (key.size() > 64) {
      continue;
    }
    if (v.is_number() || v.is_boolean()) {
      out[key] = v;
    } else if (v.is_string()) {
      out[key] = bounded_text(v.get<std::string>(), 200);
    }
  }
  return out;
}

void
coordinator_hello(const json& header)
{
  (void)header.value("site", std::string());
}

void
coordinator_update(const json& header)
{
  // on_head
  (void)header_uint(header, "task");
  (void)header_uint(header, "round");
  // on_update: the metrics go into the round's ledger entry.
  json metrics = json::object();
  if (const auto m = header.find("metrics"); m != header.end()) {
    metrics = bounded_metrics(*m);
  }
  (void)metrics.dump();
}

void
coordinator_error(const json& header)
{
  (void)bounded_text(header.value("message", std::string("(no message)")), 500);
  (void)header_uint(header, "task");
}

// session.cpp's keep_receipt, up to the signature check (the coordinator's certificate is not
// at hand here).
void
keep_receipt(const json& header)
{
  const auto it = header.find("ledger_head");
  if (it == header.end() || it->is_null()) {
    return;
  }
  if (const auto r = core::parse_receipt(*it)) {
    FEDL_FUZZ_CHECK(r->sha256.size() == 64 && r->ca.size() == 64 && r->sig.size() <= 200);
    (void)core::receipt_payload(r->seq, r->sha256, r->ca);
  }
}

void
site_welcome(const json& header)
{
  const double heartbeat = std::clamp(header.value("heartbeat", 5.0), 0.1, 3600.0);
  FEDL_FUZZ_CHECK(heartbeat >= 0.1 && heartbeat <= 3600.0);
  (void)header_uint(header, "round");
  (void)header_uint(header, "rounds");
  // check_coordinator_record (with --max-epsilon), which catches std::exception around the reads.
  const auto report = header.value("privacy", json());
  if (report.is_null()) {
    return;
  }
  core::RdpAccount record;
  try {
    record = core::RdpAccount::from_json(report, "the coordinator's record of this site's privacy spending");
    if (const auto runs = report.find("runs");
        fuzz::open_bugs_crash() || runs == report.end() || !fuzz::float_past<std::uint64_t>(*runs)) {
      (void)report.value("runs", std::uint64_t{0}); // the open bug
    }
  } catch (const std::exception& e) {
    fuzz::refused(e);
    return;
  }
  FEDL_FUZZ_CHECK(record.epsilon(site_delta).epsilon >= 0);
}

// A task's "training" object read by the TrainingConfig reader of fedl.json (the trainer's own
// reader, training_settings in cmd/worker.cpp, is outside fedl_core).
void
training(const json& t)
{
  const json config = {
    {"version", 1}, {"model", {{"arch", "logreg"}, {"input_shape", "4"}, {"classes", 3}}}, {"training", t}};
  try {
    const auto c = core::config_from_json(config, "the task");
    core::check_training(c.training);
  } catch (const core::UsageError& e) {
    fuzz::refused(e);
  }
}

void
site_task(const json& header)
{
  // on_frame
  (void)header_uint(header, "task");
  const auto round = header_uint(header, "round");
  keep_receipt(header);
  // The trainer thread's task frame for the child, in a try that catches std::exception.
  try {
    json child = {
      {"round", round}, {"seed", header_uint(header, "seed")}, {"training", header.value("training", json::object())}};
    if (header.contains("base_sha256")) {
      child["base_sha256"] = header["base_sha256"];
    }
    (void)core::frame_head(core::FrameType::task, child, 0);
    training(child["training"]);
    // on_trained, in its try: the attempt goes back with the update.
    (void)header_uint(header, "attempt");
  } catch (const std::exception& e) {
    fuzz::refused(e);
  }
}

void
site_done(const json& header)
{
  keep_receipt(header);
  std::uint64_t last_round = 0;
  last_round = header_uint(header, "rounds", last_round);
  (void)header.value("reason", "done");
}

void
site_error(const json& header)
{
  (void)header.value("message", std::string("(no message)"));
  if (header_int(header, "code", 1) == static_cast<int>(core::ExitCode::verify)) {
    return;
  }
  (void)header.value("replaced", false);
}

// on_trained, all in a try that catches std::exception (a failed task); the reply's type is the
// low bit of the selector's high nibble.
void
site_trainer_reply(const json& header, bool is_update)
{
  try {
    if (!is_update) {
      (void)bounded_text(header.value("message", std::string("the trainer failed")), 500);
      (void)header_int(header, "code", 1);
      return;
    }
    json metrics = {{"num_samples", header_uint(header, "num_samples")},
                    {"steps", header_uint(header, "steps")},
                    {"seconds", header_number(header, "seconds", 0.0)}};
    if (header.contains("loss")) {
      metrics["loss"] = header_number(header, "loss", 0.0);
    }
    if (header.contains("dp")) {
      const auto report = core::DpSgdReport::from_json(header["dp"], "the trainer's DP-SGD report");
      FEDL_FUZZ_CHECK(report.epsilon >= 0);
    }
    (void)(metrics.contains("loss") ? metrics["loss"].get<double>() : 0.0);
    (void)metrics["num_samples"].get<std::uint64_t>();
    (void)metrics["seconds"].get<double>();
  } catch (const std::exception& e) {
    fuzz::refused(e);
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
