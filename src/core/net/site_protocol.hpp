// SPDX-License-Identifier: Apache-2.0
// The protocol between `fedl serve` and `fedl join` (fedl-files(5), WIRE PROTOCOL): one type per
// frame header, each with its one encoder and decoder, for both sides (federation/coordinator.cpp,
// federation/session.cpp).
//
//   site                                   coordinator
//   HELLO    Hello                  ->
//                                   <-     WELCOME  Welcome
//                                   <-     TASK     Task, body: the global model
//   UPDATE   Update, body: the signed update file ->
//   ERROR    ErrorReport (a failed task, or before closing) <->
//                                   <-     DONE     Done
//
// Decoding: a field of the wrong type, or a number out of its type's range, is a ProtocolError
// (the receiver closes the connection); a missing field takes its default. What a well-typed value
// means (a negative deadline, training settings a site will not run) is the receiver's policy.
#pragma once

#include "core/net/frame.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace fedl::core {

struct Hello
{
  std::string site;
  std::uint64_t version = protocol_version;

  nlohmann::json to_header() const;
  static Hello from_header(const nlohmann::json& header);
};

struct Welcome
{
  std::uint64_t round = 0;  // the round being run (or next)
  std::uint64_t rounds = 0; // the last round
  double heartbeat = 5;     // seconds between heartbeats on a quiet connection
  std::string ca_fingerprint;
  // What the ledger says this site spent with DP-SGD ({"orders", "rdp", "runs"}); null if nothing.
  nlohmann::json privacy;
  // The newest update signature version the coordinator checks (trust/update.hpp); absent: 1.
  std::uint64_t update_signature = 1;

  nlohmann::json to_header() const;
  static Welcome from_header(const nlohmann::json& header);
};

struct Task
{
  std::uint64_t round = 0;
  std::uint64_t attempt = 0;
  std::uint64_t task = 0;         // the id the update must answer; never 0
  std::optional<double> deadline; // seconds left when it was sent
  std::uint64_t seed = 0;
  nlohmann::json training = nlohmann::json::object(); // as fedl.json's; the site reads it strictly
  std::optional<std::string> base_sha256;             // of the model in the body
  nlohmann::json ledger_head;                         // the coordinator's signed head (receipt.hpp); null if none
  // With secure aggregation: the attempt's SecAggSetup (net/secagg_protocol.hpp); null if none.
  nlohmann::json secure_aggregation;

  nlohmann::json to_header() const;
  static Task from_header(const nlohmann::json& header);
};

struct Update
{
  std::uint64_t round = 0;
  std::uint64_t task = 0;
  std::uint64_t attempt = 0;
  nlohmann::json metrics = nlohmann::json::object(); // the receiver bounds what it keeps
  std::optional<SandboxLevel> sandbox;               // how the site confined its trainer
  std::optional<ModelPolicy> model_policy;           // what it accepts of TorchScript (--model-policy)

  nlohmann::json to_header() const;
  static Update from_header(const nlohmann::json& header);
};

// A site's metrics as the coordinator logs and records them: at most 32 entries of a number, a
// boolean or a string (valid UTF-8, at most 200 bytes) under a name of at most 64 bytes; anything
// else the site sent is left out.
nlohmann::json bounded_metrics(const nlohmann::json& metrics);

struct Done
{
  std::uint64_t rounds = 0; // the last round completed
  std::string reason;       // rounds, target-accuracy, privacy-budget
  nlohmann::json ledger_head;

  nlohmann::json to_header() const;
  static Done from_header(const nlohmann::json& header);
};

// An ERROR frame. From a site with a task id: that task failed and the connection stays;
// otherwise the sender closes the connection (FramedConnection::send_error_and_close).
struct ErrorReport
{
  std::string message;
  std::int64_t code = 1;             // the exit code it stands for (3: trust, 4: budget)
  std::optional<std::uint64_t> task; // the failed task
  std::optional<std::uint64_t> round;
  std::string reason_class; // a site's failed task: bad-settings, bad-model, ...
  bool replaced = false;    // a newer connection of the same site took over

  nlohmann::json to_header() const;
  static ErrorReport from_header(const nlohmann::json& header);
};

} // namespace fedl::core
