// SPDX-License-Identifier: Apache-2.0
// Fuzz target "wire": the JSON headers of the frames that the coordinator and a site receive,
// read the way they read them. The input is one selector byte (which receiver and frame type,
// below) and a frame header's text. The text goes through decode_header (core/frame.hpp) as
// FramedConnection hands it over; then through the typed readers that the receiver calls on it:
// RdpAccount::from_json and DpSgdReport::from_json (core/privacy.hpp), parse_receipt for the
// ledger head of a task or done frame (core/receipt.hpp), valid_utf8 and escape_controls for the
// peer text the coordinator keeps (core/text.hpp), and for a task's "training" object the
// TrainingConfig reader of fedl.json (config_from_json, core/config.hpp).
//
// The coordinator's and the site's own field reads (header.value(...) in coordinator.cpp's
// on_head/on_frame/on_hello/on_update and session.cpp's on_frame/on_trained) are not functions of
// their own; they are repeated here read for read, with the same types and defaults, so that
// what they do with a hostile header is fuzzed too. Keep them in step with those files.
//
// What a receiver may throw: ProtocolError (decode_header), core::Error (the typed readers;
// their callers catch it), and nlohmann::json::exception for a field of the wrong type where
// FramedConnection catches it (the callbacks on_head and on_frame: it closes the connection
// with a protocol error). The site's handling of its trainer's reply (on_trained) runs outside
// those callbacks, so a json::exception there is a finding.
//
// Open bugs (tests/fuzz/open/wire/, tests/fuzz/README.md) would stop every run of this target
// within seconds, so by default the harness steps around them, each at one marked place:
//   1. value<int or uint64>() on a float past the integer type's range is undefined behaviour
//      (nlohmann converts with a static_cast): the reads below return the default instead.
//   2. on_trained lets a json::exception escape (a trainer reply field of the wrong type): it
//      is caught here.
// FEDL_FUZZ_OPEN=1 in the environment turns the steps off, so that the open/ reproducers crash.
#include "fuzz.hpp"

#include "core/config.hpp"
#include "core/error.hpp"
#include "core/frame.hpp"
#include "core/privacy.hpp"
#include "core/receipt.hpp"
#include "core/text.hpp"

#include <algorithm>
#include <type_traits>

using namespace fedl;
using nlohmann::json;

namespace {

// header.value(key, fallback), as the receivers call it, but for open bug 1.
template<typename T>
T
value(const json& header, const char* key, T fallback)
{
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    const auto it = header.find(key);
    if (!fuzz::open_bugs_crash() && it != header.end() && fuzz::float_past<T>(*it)) {
      return fallback; // open bug 1
    }
  }
  return header.value(key, fallback);
}

std::string
value(const json& header, const char* key, const char* fallback)
{
  return header.value(key, fallback);
}

enum class Receiver : std::uint8_t {
  coordinator_hello,   // coordinator.cpp on_hello
  coordinator_update,  // coordinator.cpp on_head, then on_update
  coordinator_error,   // coordinator.cpp on_frame, FrameType::error
  site_welcome,        // session.cpp on_frame, FrameType::welcome, with check_coordinator_record
  site_task,           // session.cpp on_frame, FrameType::task, then the trainer thread
  site_done,           // session.cpp on_frame, FrameType::done
  site_error,          // session.cpp on_frame, FrameType::error
  site_trainer_reply,  // session.cpp on_trained: the trainer child's update or error frame
  count
};

// A site's max-epsilon delta, for the epsilon of an account it reads.
constexpr double site_delta = 1e-5;

void
coordinator_hello(const json& header)
{
  const auto claimed = value(header, "site", std::string());
  (void)claimed;
}

// Peer text as the coordinator keeps it (core/text.hpp): valid UTF-8 of at most `max` bytes.
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
coordinator_update(const json& header)
{
  // on_head
  const auto task = value(header, "task", std::uint64_t{0});
  const auto round = value(header, "round", std::uint64_t{0});
  (void)task;
  (void)round;
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
  auto message = bounded_text(value(header, "message", std::string("(no message)")), 500);
  (void)message;
  (void)value(header, "task", std::uint64_t{0});
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
  const double heartbeat = std::clamp(value(header, "heartbeat", 5.0), 0.1, 3600.0);
  FEDL_FUZZ_CHECK(heartbeat >= 0.1 && heartbeat <= 3600.0);
  (void)value(header, "round", 0);
  (void)value(header, "rounds", 0);
  // check_coordinator_record, which catches std::exception around the two reads.
  const auto report = value(header, "privacy", json());
  if (report.is_null()) {
    return;
  }
  core::RdpAccount record;
  try {
    record = core::RdpAccount::from_json(report, "the coordinator's record of this site's privacy spending");
    (void)value(report, "runs", std::uint64_t{0});
  } catch (const std::exception& e) {
    fuzz::refused(e);
    return;
  }
  const double epsilon = record.epsilon(site_delta).epsilon;
  FEDL_FUZZ_CHECK(epsilon >= 0);
}

// A task's "training" object read by the TrainingConfig reader of fedl.json (the trainer's own
// reader, training_settings in cmd/worker.cpp, is outside fedl_core).
void
training(const json& t)
{
  const json config = {{"version", 1},
                       {"model", {{"arch", "logreg"}, {"input_shape", "4"}, {"classes", 3}}},
                       {"training", t}};
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
  const auto task = value(header, "task", std::uint64_t{0});
  const auto round = value(header, "round", std::uint64_t{0});
  (void)task;
  keep_receipt(header);
  // The trainer thread's task frame for the child.
  json child = {{"round", round},
                {"seed", value(header, "seed", std::uint64_t{0})},
                {"training", value(header, "training", json::object())}};
  if (header.contains("base_sha256")) {
    child["base_sha256"] = header["base_sha256"];
  }
  try {
    (void)core::frame_head(core::FrameType::task, child, 0);
  } catch (const core::Error& e) {
    fuzz::refused(e);
  }
  training(child["training"]);
  // on_trained, when the update goes back.
  (void)value(header, "attempt", 0);
}

void
site_done(const json& header)
{
  keep_receipt(header);
  std::uint64_t last_round = 0;
  last_round = value(header, "rounds", last_round);
  (void)value(header, "reason", "done");
}

void
site_error(const json& header)
{
  const auto message = value(header, "message", std::string("(no message)"));
  (void)message;
  if (value(header, "code", 1) == static_cast<int>(core::ExitCode::verify)) {
    return;
  }
  (void)value(header, "replaced", false);
}

// on_trained; the reply's type is the low bit of the selector's high nibble.
void
site_trainer_reply(const json& header, bool is_update)
{
  if (!is_update) {
    (void)value(header, "message", std::string("the trainer failed"));
    (void)value(header, "code", 1);
    return;
  }
  try {
    if (header.contains("dp")) {
      const auto report = core::DpSgdReport::from_json(header["dp"], "the trainer's DP-SGD report");
      FEDL_FUZZ_CHECK(report.epsilon >= 0);
    }
  } catch (const core::Error& e) {
    fuzz::refused(e);
    return;
  }
  json metrics = {{"num_samples", value(header, "num_samples", 0)},
                  {"steps", value(header, "steps", 0)},
                  {"seconds", value(header, "seconds", 0.0)}};
  if (header.contains("loss")) {
    metrics["loss"] = value(header, "loss", 0.0);
  }
  (void)(metrics.contains("loss") ? metrics["loss"].get<double>() : 0.0);
  (void)metrics["num_samples"].get<std::uint64_t>();
  (void)metrics["seconds"].get<double>();
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
    try {
      site_trainer_reply(header, (data[0] & 0x10) == 0);
    } catch (const nlohmann::json::exception& e) {
      if (fuzz::open_bugs_crash()) {
        throw;
      }
      fuzz::refused(e); // open bug 2
    }
    return 0;
  }
  try {
    switch (receiver) {
    case Receiver::coordinator_hello: coordinator_hello(header); break;
    case Receiver::coordinator_update: coordinator_update(header); break;
    case Receiver::coordinator_error: coordinator_error(header); break;
    case Receiver::site_welcome: site_welcome(header); break;
    case Receiver::site_task: site_task(header); break;
    case Receiver::site_done: site_done(header); break;
    case Receiver::site_error: site_error(header); break;
    default: break;
    }
  } catch (const nlohmann::json::exception& e) {
    // FramedConnection::bad_header: the connection closes with a protocol error.
    fuzz::refused(e);
  }
  return 0;
}
