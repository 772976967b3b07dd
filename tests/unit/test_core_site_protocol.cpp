// SPDX-License-Identifier: Apache-2.0
// The serve <-> join frame headers: each encoder's output decodes to the same message, absent
// fields take their defaults, and a field of the wrong type is a ProtocolError naming it.
#include "core/net/site_protocol.hpp"

#include <doctest/doctest.h>

using namespace fedl::core;
using json = nlohmann::json;

TEST_CASE("site protocol: every message survives its encoder and decoder")
{
  const auto hello = Hello::from_header(Hello{"site-1"}.to_header());
  CHECK(hello.site == "site-1");
  CHECK(hello.version == protocol_version);

  const Welcome w{3, 10, 2.5, "ab12", json{{"runs", 2}}, 2};
  const auto w2 = Welcome::from_header(w.to_header());
  CHECK(w2.round == 3);
  CHECK(w2.rounds == 10);
  CHECK(w2.heartbeat == 2.5);
  CHECK(w2.ca_fingerprint == "ab12");
  CHECK(w2.privacy == json{{"runs", 2}});
  CHECK(w2.update_signature == 2);
  CHECK_FALSE(Welcome{}.to_header().contains("privacy")); // none spent: not sent

  const Task t{4, 2, 77, 12.5, 9, json{{"epochs", 1}}, std::string(64, 'a'), json{{"seq", 5}}, json()};
  const auto t2 = Task::from_header(t.to_header());
  CHECK(t2.round == 4);
  CHECK(t2.attempt == 2);
  CHECK(t2.task == 77);
  CHECK(t2.deadline == 12.5);
  CHECK(t2.seed == 9);
  CHECK(t2.training == json{{"epochs", 1}});
  CHECK(t2.base_sha256 == std::string(64, 'a'));
  CHECK(t2.ledger_head == json{{"seq", 5}});
  CHECK(t2.secure_aggregation.is_null());
  auto with_setup = t;
  with_setup.secure_aggregation = json{{"index", 2}};
  CHECK(Task::from_header(with_setup.to_header()).secure_aggregation == json{{"index", 2}});

  const auto u =
    Update::from_header(Update{4, 77, 2, json{{"loss", 0.5}}, SandboxLevel::strict, ModelPolicy::pinned}.to_header());
  CHECK(u.round == 4);
  CHECK(u.task == 77);
  CHECK(u.attempt == 2);
  CHECK(u.metrics == json{{"loss", 0.5}});
  CHECK(u.sandbox == SandboxLevel::strict);
  CHECK(u.model_policy == ModelPolicy::pinned);
  // An older site says nothing of its sandbox; a word other than off, auto or strict is refused.
  auto no_sandbox = Update{4, 77, 2, json::object(), std::nullopt, std::nullopt}.to_header();
  CHECK_FALSE(no_sandbox.contains("sandbox"));
  CHECK_FALSE(Update::from_header(no_sandbox).sandbox);
  no_sandbox["sandbox"] = "very";
  CHECK_THROWS_AS(Update::from_header(no_sandbox), ProtocolError);
  no_sandbox["sandbox"] = 2;
  CHECK_THROWS_AS(Update::from_header(no_sandbox), ProtocolError);
  // The same for the site's TorchScript policy: nothing said, or strict, inspect or pinned.
  auto policy = Update{4, 77, 2, json::object(), std::nullopt, std::nullopt}.to_header();
  CHECK_FALSE(policy.contains("model_policy"));
  CHECK_FALSE(Update::from_header(policy).model_policy);
  policy["model_policy"] = "trusting";
  CHECK_THROWS_WITH_AS(Update::from_header(policy), "frame header field model_policy is not strict, inspect or pinned",
                       ProtocolError);
  policy["model_policy"] = json::array();
  CHECK_THROWS_AS(Update::from_header(policy), ProtocolError);

  const auto d = Done::from_header(Done{10, "rounds", nullptr}.to_header());
  CHECK(d.rounds == 10);
  CHECK(d.reason == "rounds");
  CHECK(d.ledger_head.is_null());

  const ErrorReport e{"bad-model: no", 1, 77, 4, "bad-model", false};
  const auto h = e.to_header();
  CHECK(h == json{{"message", "bad-model: no"}, {"code", 1}, {"task", 77}, {"round", 4}, {"class", "bad-model"}});
  const auto e2 = ErrorReport::from_header(h);
  CHECK(e2.task == 77);
  CHECK(e2.round == 4);
  CHECK(e2.reason_class == "bad-model");
  CHECK_FALSE(e2.replaced);
}

TEST_CASE("site protocol: absent fields take defaults; a wrong type is a protocol error naming the field")
{
  const auto t = Task::from_header(json::object());
  CHECK(t.task == 0);
  CHECK_FALSE(t.deadline);
  CHECK_FALSE(t.base_sha256);
  CHECK(t.training == json::object());
  CHECK(ErrorReport::from_header(json::object()).message == "(no message)");
  CHECK(Welcome::from_header(json::object()).heartbeat == 5);
  // An older coordinator's welcome says nothing: it checks v1 signatures only.
  CHECK(Welcome::from_header(json::object()).update_signature == 1);

  const auto fails = [](auto decode, const json& header, const std::string& field) {
    CAPTURE(header.dump());
    CHECK_THROWS_WITH_AS(decode(header), doctest::Contains(("field " + field).c_str()), ProtocolError);
  };
  fails(Task::from_header, json{{"task", -1}}, "task");
  fails(Task::from_header, json{{"round", 1.5}}, "round");
  fails(Task::from_header, json{{"deadline", "soon"}}, "deadline");
  fails(Task::from_header, json{{"base_sha256", 7}}, "base_sha256");
  fails(Task::from_header, json{{"training", json::array()}}, "training");
  fails(Task::from_header, json{{"ledger_head", "x"}}, "ledger_head");
  fails(Update::from_header, json{{"metrics", "fast"}}, "metrics");
  fails(Hello::from_header, json{{"site", 1}}, "site");
  fails(Welcome::from_header, json{{"heartbeat", "often"}}, "heartbeat");
  fails(Done::from_header, json{{"reason", json::object()}}, "reason");
  fails(ErrorReport::from_header, json{{"message", 5}}, "message");
  fails(ErrorReport::from_header, json{{"replaced", 1}}, "replaced");
  fails(ErrorReport::from_header, json{{"code", "3"}}, "code");
}
