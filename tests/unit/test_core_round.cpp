// SPDX-License-Identifier: Apache-2.0
#include "core/federation/round.hpp"
#include "core/trust/pki.hpp"
#include "core/trust/receipt.hpp"
#include "core/trust/update.hpp"
#include "core/trust/workspace.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/text.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <openssl/evp.h>

using namespace fedl::core;
using fedl::test::TempDir;
namespace fs = std::filesystem;

namespace {

// The test model: "w" [2,2] and "b" [2], written with these values.
const std::vector<float> k_base{1, 2, 3, 4, 5, 6};

std::vector<TensorView>
model_views(const std::vector<float>& flat)
{
  const auto bytes = std::as_bytes(std::span(flat));
  return {{"w", DType::f32, {2, 2}, bytes.subspan(0, 4 * sizeof(float))},
          {"b", DType::f32, {2}, bytes.subspan(4 * sizeof(float))}};
}

// The model's values as one flat vector, w then b.
std::vector<float>
read_flat(const fs::path& path)
{
  const SafetensorsFile file(path);
  std::vector<float> out;
  for (const char* name : {"w", "b"}) {
    const auto* t = file.content().find(name);
    REQUIRE(t != nullptr);
    std::vector<float> v(t->data.size() / sizeof(float));
    std::memcpy(v.data(), t->data.data(), t->data.size());
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

// A provisioned workspace with the sites alice and bob, whose initial model is k_base.
class TestWorkspace
{
public:
  TestWorkspace() : m_ws(m_dir / "ws")
  {
    fs::create_directories(m_ws.models());
    write_safetensors(m_ws.model(0), model_views(k_base), {{"fedl.kind", "model"}});
    FederationConfig config;
    config.model.arch = "mlp";
    config.model.input_shape = {4};
    config.model.classes = 2;
    config.clients = {"alice", "bob"};
    provision_workspace(m_ws, config, "unit");
    fs::create_directories(m_dir / "in");
  }

  const Workspace& ws() const { return m_ws; }
  fs::path in_dir() const { return m_dir / "in"; }
  fs::path in(const std::string& name) const { return in_dir() / name; }

  // Writes an update of the latest model, adding `delta` to every value, signed by `site` (or
  // unsigned if empty), claiming `samples` samples.
  fs::path update(const std::string& name, float delta, const std::string& site, std::uint64_t samples = 10) const
  {
    const auto plan = plan_workspace_round(m_ws);
    const std::vector<float> d(k_base.size(), delta);
    const auto views = model_views(d);
    Metadata meta{{"fedl.kind", "update"},
                  {"fedl.base_sha256", file_sha256(plan.base)},
                  {"fedl.num_samples", std::to_string(samples)}};
    if (!site.empty()) {
      const auto id = read_identity(m_ws.client(site) / "client.crt", m_ws.client(site) / "client.key");
      const auto info = certificate_info(id.cert);
      meta["fedl.site"] = info.common_name;
      meta["fedl.cert_sha256"] = info.fingerprint;
      meta["fedl.certificate"] = to_pem(id.cert);
      meta["fedl.signature"] = sign(id.key, as_bytes(update_signed_payload(views, meta)));
    }
    const auto path = in(name);
    write_safetensors(path, views, meta);
    return path;
  }

  // As update(), signed by `site` as fedl join signs (sign_update, update-signature-v2).
  fs::path update_v2(const std::string& name, float delta, const std::string& site) const
  {
    const auto plan = plan_workspace_round(m_ws);
    const std::vector<float> d(k_base.size(), delta);
    const auto views = model_views(d);
    Metadata meta{{"fedl.kind", "update"}, {"fedl.base_sha256", file_sha256(plan.base)}, {"fedl.num_samples", "10"}};
    sign_update(views, meta, read_identity(m_ws.client(site) / "client.crt", m_ws.client(site) / "client.key"));
    const auto path = in(name);
    write_safetensors(path, views, meta);
    return path;
  }

  // Writes in/`name`: the update at `from` with its metadata changed by `edit`, signed again by
  // `site` (its key, over whatever its certificate metadata now says) unless `site` is empty.
  fs::path rewrite(const fs::path& from, const std::string& name, const std::string& site,
                   const std::function<void(Metadata&)>& edit) const
  {
    const SafetensorsFile file(from);
    const auto& st = file.content();
    auto meta = st.metadata;
    edit(meta);
    if (!site.empty()) {
      const auto id = read_identity(m_ws.client(site) / "client.crt", m_ws.client(site) / "client.key");
      meta.erase("fedl.signature");
      meta["fedl.signature"] = sign(id.key, as_bytes(update_signed_payload(st.tensors, meta)));
    }
    write_safetensors(in(name), st.tensors, meta);
    return in(name);
  }

private:
  TempDir m_dir;
  Workspace m_ws;
};

// Every file under `root` with its SHA-256, to tell whether anything was written.
std::map<std::string, std::string>
snapshot(const fs::path& root)
{
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    out[fs::relative(e.path(), root).string()] = e.is_regular_file() ? file_sha256(e.path()) : "dir";
  }
  return out;
}

std::string
message_of(const std::function<void()>& f)
{
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

} // namespace

TEST_CASE("round: validate_round rejects an update that another site than the one that delivered it made")
{
  const TestWorkspace t;
  const auto plan = plan_workspace_round(t.ws());
  const auto from_alice = t.update("alice.st", 1.0F, "alice");

  SUBCASE("skipped: listed under the site that delivered it, with a reason naming both sites")
  {
    const std::vector<RoundCandidate> candidates{{from_alice, "bob"}};
    auto v = validate_round(plan, candidates, OnBadUpdate::skip);
    CHECK(v.accepted.empty());
    REQUIRE(v.rejected.size() == 1);
    CHECK(v.rejected[0]["file"] == "alice.st");
    // The ledger names who is accountable (TLS authenticated bob), not what the file claims.
    CHECK(v.rejected[0]["site"] == "bob");
    const auto reason = v.rejected[0]["reason"].get<std::string>();
    CHECK(reason.find("alice") != std::string::npos);
    CHECK(reason.find("bob") != std::string::npos);
  }
  SUBCASE("failing: BadUpdateError names the file and both sites")
  {
    const std::vector<RoundCandidate> candidates{{from_alice, "bob"}};
    try {
      (void)validate_round(plan, candidates, OnBadUpdate::fail);
      FAIL("no exception");
    } catch (const BadUpdateError& e) {
      CHECK(e.code() == ExitCode::verify);
      CHECK(e.path() == from_alice);
      CHECK(std::string(e.what()).find(from_alice.string()) != std::string::npos);
      CHECK(e.reason().find("alice") != std::string::npos);
      CHECK(e.reason().find("bob") != std::string::npos);
    }
  }
  SUBCASE("accepted when the sites agree, or when no site is expected")
  {
    const std::vector<RoundCandidate> candidates{{from_alice, "alice"}, {t.update("bob.st", 2.0F, "bob"), ""}};
    auto v = validate_round(plan, candidates, OnBadUpdate::fail);
    REQUIRE(v.accepted.size() == 2);
    CHECK(v.accepted[0].site == "alice");
    CHECK(v.accepted[1].site == "bob");
    CHECK(v.accepted[0].digest.version == 1);
    CHECK(v.accepted[0].digest.hex == file_sha256(from_alice));
    CHECK(v.accepted[0].samples == 10);
    CHECK(v.rejected.empty());
  }
}

TEST_CASE("round: v2-signed updates are checked over one digest, beside v1 ones, and the ledger says which")
{
  const TestWorkspace t;
  const auto plan = plan_workspace_round(t.ws());
  const auto v2 = t.update_v2("alice.st", 1.0F, "alice");
  const auto v1 = t.update("bob.st", 3.0F, "bob");
  const auto v2_digest = update_digest_v2(SafetensorsFile(v2).content());

  SUBCASE("both accepted; the round entry records the digest of the one, the file hash of the other")
  {
    const std::vector<RoundCandidate> candidates{{v2, "alice"}, {v1, "bob"}};
    auto v = validate_round(plan, candidates, OnBadUpdate::fail);
    REQUIRE(v.accepted.size() == 2);
    CHECK(v.accepted[0].digest.version == 2);
    CHECK(v.accepted[0].digest.hex == v2_digest);
    CHECK(v.accepted[1].digest.version == 1);
    RoundSettings settings;
    settings.strategy = parse_strategy("fedavg");
    const auto result = commit_round(v, settings);
    const auto& p = result.ledger_body["participants"];
    REQUIRE(p.size() == 2);
    CHECK(p[0]["signature_version"] == 2);
    CHECK(p[0]["update_digest"] == v2_digest);
    CHECK_FALSE(p[0].contains("update_sha256"));
    CHECK(p[1]["update_sha256"] == file_sha256(v1));
    CHECK_FALSE(p[1].contains("signature_version"));
    CHECK(read_flat(result.model)[0] == doctest::Approx(1 + 2.0)); // the mean of +1 and +3
    CHECK(result.sha256 == file_sha256(result.model));             // hashed as written, as it is on disk
  }
  SUBCASE("a value changed after signing breaks the signature")
  {
    auto bytes = fedl::test::read_file(v2);
    bytes.back() = static_cast<char>(bytes.back() ^ 1);
    fedl::test::write_file(t.in("changed.st"), bytes);
    const std::vector<RoundCandidate> candidates{{t.in("changed.st"), "alice"}};
    auto v = validate_round(plan, candidates, OnBadUpdate::skip);
    REQUIRE(v.rejected.size() == 1);
    CHECK(v.rejected[0]["reason"].get<std::string>().find("does not verify") != std::string::npos);
  }
  SUBCASE("the digest computed as the bytes arrived is taken for a file the caller owns, if it describes it")
  {
    UpdateDigester d;
    const auto bytes = fedl::test::read_file(v2);
    d.update(as_bytes(bytes));
    auto streamed = d.finish();
    const std::vector<RoundCandidate> owned{{v2, "alice", true, streamed}};
    CHECK(validate_round(plan, owned, OnBadUpdate::fail).accepted.at(0).digest.hex == v2_digest);
    // A digest that says another head (another file's) is not taken: the file is hashed itself.
    UpdateDigest other = streamed;
    other.head += " ";
    other.hex = std::string(64, '0');
    const std::vector<RoundCandidate> mismatched{{v2, "alice", true, other}};
    CHECK(validate_round(plan, mismatched, OnBadUpdate::fail).accepted.at(0).digest.hex == v2_digest);
    // Nor for a file named on a command line, which someone else may change.
    const std::vector<RoundCandidate> not_owned{{v2, "alice", false, other}};
    CHECK(validate_round(plan, not_owned, OnBadUpdate::fail).accepted.at(0).digest.hex == v2_digest);
  }
  SUBCASE("a signature version this fedl does not know is refused, naming it")
  {
    const auto future = t.rewrite(v2, "future.st", "", [](Metadata& m) { m["fedl.signature_version"] = "3"; });
    const std::vector<RoundCandidate> candidates{{future, "alice"}};
    auto v = validate_round(plan, candidates, OnBadUpdate::skip);
    REQUIRE(v.rejected.size() == 1);
    CHECK(v.rejected[0]["reason"].get<std::string>().find("fedl.signature_version '3'") != std::string::npos);
  }
}

TEST_CASE("round: validate_round writes nothing, whatever it accepts or rejects")
{
  const TestWorkspace t;
  const auto a = t.update("a.st", 1.0F, "alice");
  const auto a2 = t.update("a2.st", 3.0F, "alice");
  const auto b = t.update("b.st", 2.0F, "bob");
  const auto unsigned_update = t.update("u.st", 2.0F, "");
  fedl::test::write_file(t.in("junk.st"), "not safetensors");
  const auto before_ws = snapshot(t.ws().root());
  const auto before_in = snapshot(t.in_dir());

  const auto plan = plan_workspace_round(t.ws());
  CHECK(plan.round == 1);
  CHECK(plan.base == t.ws().model(0));
  CHECK(plan.out == t.ws().model(1));
  const std::vector<RoundCandidate> candidates{
    {a, ""}, {a, ""}, {a2, ""}, {b, "bob"}, {unsigned_update, ""}, {t.in("junk.st"), ""}, {t.in("missing.st"), ""}};
  auto v = validate_round(plan, candidates, OnBadUpdate::skip);
  REQUIRE(v.accepted.size() == 2);
  CHECK(v.accepted[0].path == a);
  CHECK(v.accepted[1].path == b);
  REQUIRE(v.rejected.size() == 5);
  CHECK(v.rejected[0]["reason"] == "the same update file is given twice");
  CHECK(v.rejected[1]["reason"] == "site alice sent more than one update this round");
  CHECK(v.rejected[2]["reason"].get<std::string>().find("not signed by a site of this federation") !=
        std::string::npos);

  CHECK(snapshot(t.ws().root()) == before_ws);
  CHECK(snapshot(t.in_dir()) == before_in);
  CHECK_FALSE(fs::exists(t.ws().model(1)));
}

TEST_CASE("round: validate_round refuses a base model that is not the one the ledger records")
{
  const TestWorkspace t;
  const auto plan = plan_workspace_round(t.ws());
  write_safetensors(t.ws().model(0), model_views({9, 9, 9, 9, 9, 9}), {{"fedl.kind", "model"}});
  const std::vector<RoundCandidate> none;
  try {
    (void)validate_round(plan, none, OnBadUpdate::skip);
    FAIL("no exception");
  } catch (const VerifyError& e) {
    CHECK(std::string(e.what()).find("does not match the ledger") != std::string::npos);
  }
}

TEST_CASE("round: commit_round writes the model and a signed ledger entry with the extra fields and the evaluation")
{
  const TestWorkspace t;
  const auto a = t.update("a.st", 1.0F, "alice", 10);
  const auto b = t.update("b.st", 5.0F, "bob", 30);
  const auto bad = t.update("bad.st", 1.0F, "alice", 10); // delivered by bob
  const auto plan = plan_workspace_round(t.ws());
  const std::vector<RoundCandidate> candidates{{a, "alice"}, {b, "bob"}, {bad, "bob"}};
  auto v = validate_round(plan, candidates, OnBadUpdate::skip);
  REQUIRE(v.accepted.size() == 2);

  RoundSettings settings;
  settings.strategy = parse_strategy("fedavg");
  std::string evaluated_sha;
  settings.evaluate = [&](const fs::path& model) {
    CHECK(model == t.ws().model(1));
    evaluated_sha = file_sha256(model); // the model is written before it is evaluated
    return nlohmann::json{{"accuracy", 0.75}};
  };
  settings.extra = {{"attempt", 2}, {"late", nlohmann::json::array({"carol"})}, {"settings", {{"quorum", 2}}}};
  const auto r = commit_round(v, settings);

  // fedavg with η = 1: base + (10·1 + 30·5) / 40 = base + 4.
  CHECK(read_flat(t.ws().model(1)) == std::vector<float>{5, 6, 7, 8, 9, 10});
  const auto model_sha = file_sha256(t.ws().model(1));
  CHECK(r.model == t.ws().model(1));
  CHECK(r.sha256 == model_sha);
  CHECK(evaluated_sha == model_sha);
  CHECK(r.round == 1);
  CHECK(r.strategy == "fedavg");
  CHECK(r.evaluation["accuracy"] == 0.75);
  CHECK(SafetensorsFile(r.model).content().meta("fedl.round") == "1");
  CHECK(SafetensorsFile(r.model).content().meta("fedl.kind") == "model");

  const auto entries = read_workspace_ledger(t.ws());
  const auto& last = entries.back();
  CHECK(last.kind == "round");
  CHECK(last.body == r.ledger_body);
  const auto& body = last.body;
  CHECK(body["round"] == 1);
  CHECK(body["strategy"] == "fedavg");
  CHECK(body["options"]["lr"] == 1.0);
  CHECK(body["base"]["file"] == "models/global-000000.safetensors");
  CHECK(body["base"]["sha256"] == file_sha256(t.ws().model(0)));
  CHECK(body["model"]["file"] == "models/global-000001.safetensors");
  CHECK(body["model"]["sha256"] == model_sha);
  REQUIRE(body["participants"].size() == 2);
  CHECK(body["participants"][0]["site"] == "alice");
  CHECK(body["participants"][0]["num_samples"] == 10);
  CHECK(body["participants"][0]["update_sha256"] == file_sha256(a));
  CHECK(body["participants"][0]["fingerprint"] ==
        certificate_fingerprint(read_certificate(t.ws().client("alice") / "client.crt")));
  CHECK(body["participants"][1]["site"] == "bob");
  REQUIRE(body["rejected"].size() == 1);
  CHECK(body["rejected"][0]["file"] == "bad.st");
  CHECK(body["evaluation"]["accuracy"] == 0.75);
  CHECK(body["attempt"] == 2);
  CHECK(body["late"] == nlohmann::json::array({"carol"}));
  CHECK(body["settings"]["quorum"] == 2);

  // The next round starts from the model just written.
  const auto next = plan_workspace_round(t.ws());
  CHECK(next.round == 2);
  CHECK(next.base == t.ws().model(1));
  CHECK(next.recorded_base_sha256 == model_sha);
}

TEST_CASE("round: commit_round without an evaluation or extra fields records the usual body only")
{
  const TestWorkspace t;
  const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), ""}};
  auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::fail);
  RoundSettings settings;
  const auto r = commit_round(v, settings);
  CHECK(r.evaluation.is_null());
  std::vector<std::string> keys;
  // The ledger is held by name: a range-for keeps only the outermost temporary alive (before
  // C++23), and items() refers into the vector's last entry.
  const auto ledger = read_workspace_ledger(t.ws());
  for (const auto& [key, value] : ledger.back().body.items()) {
    keys.push_back(key);
  }
  CHECK(keys == std::vector<std::string>{"base", "limits", "model", "options", "participants", "rejected", "round",
                                         "strategy"});
}

TEST_CASE("round: commit_round refuses extra fields that would replace the body's own, before writing anything")
{
  const TestWorkspace t;
  const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), ""}};
  auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::fail);
  const auto before = snapshot(t.ws().root());
  for (const char* key : {"model", "base", "participants", "evaluation"}) {
    CAPTURE(key);
    RoundSettings settings;
    settings.extra = {{key, "x"}};
    CHECK_THROWS_AS(commit_round(v, settings), Error);
    CHECK(snapshot(t.ws().root()) == before);
  }
  RoundSettings settings;
  settings.extra = nlohmann::json::array({1});
  CHECK_THROWS_AS(commit_round(v, settings), Error);
  CHECK(snapshot(t.ws().root()) == before);
}

TEST_CASE("round: commit_round refuses an empty round and an update changed since it was checked")
{
  const TestWorkspace t;
  const auto a = t.update("a.st", 1.0F, "alice");
  const auto plan = plan_workspace_round(t.ws());

  const std::vector<RoundCandidate> bad{{a, "bob"}};
  auto empty = validate_round(plan, bad, OnBadUpdate::skip);
  const auto msg = message_of([&] { (void)commit_round(empty, RoundSettings{}); });
  CHECK(msg == "no update left to aggregate (1 rejected)");

  const std::vector<RoundCandidate> good{{a, ""}};
  auto v = validate_round(plan, good, OnBadUpdate::fail);
  // Changed in place (same size, same mapping): the re-hash catches it.
  auto bytes = fedl::test::read_file(a);
  bytes.back() = static_cast<char>(bytes.back() ^ 1);
  {
    std::fstream f(a, std::ios::in | std::ios::out | std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const auto before = snapshot(t.ws().root());
  CHECK_THROWS_AS(commit_round(v, RoundSettings{}), VerifyError);
  CHECK(snapshot(t.ws().root()) == before);
}

TEST_CASE("round: stateful strategies keep per-round server state and drop the state two rounds back")
{
  const TestWorkspace t;
  RoundSettings settings;
  settings.strategy = parse_strategy("fedavgm");
  for (std::uint64_t round = 1; round <= 3; ++round) {
    CAPTURE(round);
    const std::vector<RoundCandidate> candidates{{t.update("r" + std::to_string(round) + ".st", 1.0F, "alice"), ""}};
    auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::fail);
    const auto r = commit_round(v, settings);
    CHECK(r.round == round);
    CHECK(fs::exists(t.ws().state() / fmt::format("server-{:06}.safetensors", round)));
  }
  CHECK_FALSE(fs::exists(t.ws().state() / "server-000001.safetensors"));
  CHECK(fs::exists(t.ws().state() / "server-000002.safetensors"));
  // Momentum 0.9 over three rounds of Δ = 1: m = 1, 1.9, 2.71; x = base + 1 + 1.9 + 2.71.
  const auto x = read_flat(t.ws().model(3));
  for (std::size_t i = 0; i < x.size(); ++i) {
    CHECK(x[i] == doctest::Approx(k_base[i] + 5.61F).epsilon(1e-5));
  }
}

TEST_CASE("round: outside a workspace unsigned updates are fine, there is no ledger and the state file is rewritten")
{
  TempDir dir;
  write_safetensors(dir / "base.st", model_views(k_base), {{"fedl.kind", "model"}});
  const std::vector<float> d(k_base.size(), 2.0F);
  write_safetensors(
    dir / "u.st", model_views(d),
    {{"fedl.kind", "update"}, {"fedl.base_sha256", file_sha256(dir / "base.st")}, {"fedl.num_samples", "3"}});
  const auto plan = plan_standalone_round(dir / "base.st", dir / "out.st", dir / "state.st");
  CHECK_FALSE(plan.workspace);
  const std::vector<RoundCandidate> candidates{{dir / "u.st", ""}};
  auto v = validate_round(plan, candidates, OnBadUpdate::fail);
  REQUIRE(v.accepted.size() == 1);
  CHECK(v.accepted[0].site.empty());
  RoundSettings settings;
  settings.strategy = parse_strategy("fedavgm");
  bool evaluated = false;
  settings.evaluate = [&](const fs::path&) {
    evaluated = true;
    return nlohmann::json();
  };
  const auto r = commit_round(v, settings);
  CHECK(evaluated);
  CHECK(r.round == 0);
  CHECK(r.ledger_body.is_null());
  CHECK(r.evaluation.is_null());
  CHECK(read_flat(dir / "out.st") == std::vector<float>{3, 4, 5, 6, 7, 8});
  CHECK_FALSE(SafetensorsFile(dir / "out.st").content().meta("fedl.round"));
  CHECK(fs::exists(dir / "state.st"));
  CHECK_FALSE(fs::exists(dir / "ledger.jsonl"));

  // An update that names a site must come from the site expected, signed or not.
  const std::vector<RoundCandidate> expecting{{dir / "u.st", "alice"}};
  const auto rejected = validate_round(plan, expecting, OnBadUpdate::skip);
  REQUIRE(rejected.rejected.size() == 1);
  CHECK(rejected.rejected[0]["reason"].get<std::string>().find("delivered by site alice") != std::string::npos);
}

TEST_CASE("round: where nothing records the digests, unsigned updates are not hashed, and copies are still caught")
{
  TempDir dir;
  // One tensor of 1M values: its bytes are mostly outside the sample that sets files apart.
  const std::vector<float> base(1 << 20, 1.0F);
  const auto one = [](const std::vector<float>& v) {
    return std::vector<TensorView>{
      {"w", DType::f32, {static_cast<std::int64_t>(v.size())}, std::as_bytes(std::span(v))}};
  };
  write_safetensors(dir / "base.st", one(base), {{"fedl.kind", "model"}});
  const Metadata meta{
    {"fedl.kind", "update"}, {"fedl.base_sha256", file_sha256(dir / "base.st")}, {"fedl.num_samples", "3"}};
  std::vector<float> d(base.size(), 0.5F);
  write_safetensors(dir / "a.st", one(d), meta);
  fs::copy_file(dir / "a.st", dir / "copy.st");
  d[500000] = 0.25F; // byte ~2 MB: the same size, header and sample (first 64 KB, 64 slices ~64 KB apart)
  write_safetensors(dir / "near.st", one(d), meta);
  auto plan = plan_standalone_round(dir / "base.st", dir / "out.st", std::nullopt);
  plan.record_digests = false;
  const std::vector<RoundCandidate> candidates{{dir / "a.st", ""}, {dir / "copy.st", ""}, {dir / "near.st", ""}};
  auto v = validate_round(plan, candidates, OnBadUpdate::skip);
  REQUIRE(v.accepted.size() == 2);
  CHECK(v.accepted[0].path == dir / "a.st");
  CHECK(v.accepted[1].path == dir / "near.st");
  CHECK(v.accepted[0].digest.hex.empty());
  REQUIRE(v.rejected.size() == 1);
  CHECK(v.rejected[0]["file"] == "copy.st");
  CHECK(v.rejected[0]["reason"] == "the same update file is given twice");
  RoundSettings settings;
  settings.strategy = parse_strategy("fedavg");
  const auto r = commit_round(v, settings);
  CHECK_FALSE(r.participants[0].contains("update_sha256"));
  CHECK(r.sha256 == file_sha256(dir / "out.st"));

  // Recorded (the default): every update's file hash.
  plan.record_digests = true;
  const auto recorded = validate_round(plan, candidates, OnBadUpdate::skip);
  REQUIRE(recorded.accepted.size() == 2);
  CHECK(recorded.accepted[1].digest.hex == file_sha256(dir / "near.st"));
}

namespace {

// `pem` with the month of its first UTCTime (notBefore) set to 13: OpenSSL still parses the
// DER, but reading the time fails. The CA's signature no longer matches; that is checked later.
std::string
with_bad_time(const std::string& pem)
{
  const auto begin = pem.find('\n') + 1;
  const auto end = pem.find("-----END");
  std::string b64;
  for (std::size_t i = begin; i < end; ++i) {
    if (pem[i] != '\n') {
      b64 += pem[i];
    }
  }
  std::string der(b64.size(), '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(der.data()),
                                reinterpret_cast<const unsigned char*>(b64.data()), static_cast<int>(b64.size()));
  REQUIRE(n > 0);
  der.resize(static_cast<std::size_t>(n) - std::count(b64.end() - 2, b64.end(), '='));
  const auto at = der.find("\x17\x0d");
  REQUIRE(at != std::string::npos);
  der[at + 4] = '1';
  der[at + 5] = '3';
  std::string out(4 * ((der.size() + 2) / 3) + 1, '\0');
  const int m = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(der.data()), static_cast<int>(der.size()));
  out.resize(static_cast<std::size_t>(m));
  std::string wrapped = "-----BEGIN CERTIFICATE-----\n";
  for (std::size_t i = 0; i < out.size(); i += 64) {
    wrapped += out.substr(i, 64) + "\n";
  }
  return wrapped + "-----END CERTIFICATE-----\n";
}

} // namespace

TEST_CASE("round: an update whose certificate has a malformed time field is rejected, not a crash")
{
  const TestWorkspace t;
  t.rewrite(t.update("a.st", 1.0F, "alice"), "bad.st", "alice", [](Metadata& meta) {
    meta["fedl.certificate"] = with_bad_time(meta["fedl.certificate"]);
    REQUIRE_THROWS_AS(certificate_info(certificate_from_pem(meta["fedl.certificate"], "test")), VerifyError);
  });
  // Several candidates: the checks run on worker threads, where an exception was std::terminate.
  const std::vector<RoundCandidate> candidates{
    {t.in("bad.st"), "alice"}, {t.update("b.st", 1.0F, "bob"), "bob"}, {t.in("bad.st"), ""}};
  auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::skip);
  REQUIRE(v.accepted.size() == 1);
  CHECK(v.accepted[0].site == "bob");
  REQUIRE(v.rejected.size() == 2);
  CHECK(v.rejected[0]["site"] == "alice"); // who delivered it
  CHECK(v.rejected[0]["reason"].get<std::string>().find("certificate is unreadable") != std::string::npos);
  CHECK(v.rejected[1]["site"] == ""); // nobody delivered it, and its signature proves nothing
}

TEST_CASE("round: fedl.json's limits reject huge sample counts and huge updates, and are recorded")
{
  const TestWorkspace t;
  const auto plan = plan_workspace_round(t.ws());
  REQUIRE(plan.limits);
  CHECK(plan.limits->max_num_samples == LimitsConfig::default_max_num_samples);
  const std::vector<RoundCandidate> candidates{{t.update("many.st", 1.0F, "alice", std::uint64_t{1} << 53), "alice"},
                                               {t.update("huge.st", 3e38F, "bob"), "bob"}};
  auto v = validate_round(plan, candidates, OnBadUpdate::skip);
  // The sample count is refused at once; the norm as the round aggregates the update.
  REQUIRE(v.rejected.size() == 1);
  CHECK(v.rejected[0]["reason"].get<std::string>().find("fedl.num_samples 9007199254740992 is over the federation's "
                                                        "limit of 10000000") != std::string::npos);
  const auto before = snapshot(t.ws().root());
  CHECK_THROWS_AS(commit_round(v, RoundSettings{}), ShortOfQuorum);
  CHECK(snapshot(t.ws().root()) == before);
  CHECK(v.accepted.empty());
  REQUIRE(v.rejected.size() == 2);
  CHECK(v.rejected[1]["site"] == "bob");
  CHECK(v.rejected[1]["reason"].get<std::string>().find("L2 norm") != std::string::npos);

  const std::vector<RoundCandidate> fine{{t.update("a.st", 1.0F, "alice", 10000000), "alice"}};
  auto fine_round = validate_round(plan, fine, OnBadUpdate::fail);
  const auto r = commit_round(fine_round, RoundSettings{});
  CHECK(read_workspace_ledger(t.ws()).back().body["limits"] ==
        nlohmann::json{{"max_update_norm", 1e5}, {"max_num_samples", 10000000}});
}

TEST_CASE("round: at the norm limit the decision is update_norm's, whatever order the aggregation summed in")
{
  const TestWorkspace t;
  const auto path = t.update("a.st", 3.0F, "alice");
  const double norm = update_norm(SafetensorsFile(path).content());
  auto plan = plan_workspace_round(t.ws());
  std::size_t want = 0;
  SUBCASE("exactly at the limit: accepted")
  {
    plan.limits->max_update_norm = norm;
    want = 2;
  }
  SUBCASE("the next double below: rejected")
  {
    plan.limits->max_update_norm = std::nextafter(norm, 0.0);
    want = 1;
  }
  const std::vector<RoundCandidate> candidates{{path, "alice"}, {t.update("b.st", 0.0F, "bob"), "bob"}};
  auto v = validate_round(plan, candidates, OnBadUpdate::skip);
  const auto r = commit_round(v, RoundSettings{});
  CHECK(r.participants.size() == want);
}

TEST_CASE("round: values are checked in the pass that aggregates them; an unfit update is left out as before")
{
  const TestWorkspace t;
  const auto base = plan_workspace_round(t.ws()).base;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();

  SUBCASE("in a workspace: the NaN update is rejected under its site, the round made of the others")
  {
    const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), "alice"},
                                                 {t.update("nan.st", nan, "bob"), "bob"}};
    auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::skip);
    CHECK(v.accepted.size() == 2); // not read yet
    const auto r = commit_round(v, RoundSettings{});
    REQUIRE(r.participants.size() == 1);
    CHECK(r.participants[0]["site"] == "alice");
    REQUIRE(r.rejected.size() == 1);
    CHECK(r.rejected[0]["site"] == "bob");
    CHECK(r.rejected[0]["file"] == "nan.st");
    CHECK(r.rejected[0]["reason"] == "tensor b has 2 non-finite values (the first, at flat index 0, is NaN)");
    CHECK(read_workspace_ledger(t.ws()).back().body["rejected"] == r.rejected);
    const auto flat = read_flat(r.model);
    for (std::size_t i = 0; i < flat.size(); ++i) {
      CHECK(flat[i] == k_base[i] + 1.0F);
    }
  }
  SUBCASE("failing on bad updates: BadUpdateError, and nothing written")
  {
    const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), "alice"},
                                                 {t.update("inf.st", inf, "bob"), "bob"}};
    auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::fail);
    const auto before = snapshot(t.ws().root());
    try {
      (void)commit_round(v, RoundSettings{});
      FAIL("no exception");
    } catch (const BadUpdateError& e) {
      CHECK(e.path() == t.in("inf.st"));
      CHECK(e.reason().find("is infinite") != std::string::npos);
    }
    CHECK(snapshot(t.ws().root()) == before);
  }
  SUBCASE("below the quorum once it is left out: the attempt is recorded as failed, with why")
  {
    const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), "alice"},
                                                 {t.update("nan.st", nan, "bob"), "bob"}};
    RoundSettings settings;
    settings.extra = {{"asked", 2}};
    const auto out = commit_attempt(t.ws(), 1, candidates, 2, settings);
    CHECK(out.committed.is_null());
    CHECK(out.retry == "1 valid updates of 2 asked, below the quorum of 2");
    const auto last = read_workspace_ledger(t.ws()).back();
    CHECK(last.kind == "round-failed");
    REQUIRE(last.body["rejected"].size() == 1);
    CHECK(last.body["rejected"][0]["file"] == "nan.st");
    CHECK_FALSE(fs::exists(t.ws().model(1)));
  }
  SUBCASE("every strategy, clipped or not: the same model as if the unfit update had never been offered")
  {
    std::vector<RoundCandidate> fine;
    for (int i = 0; i < 5; ++i) {
      fine.push_back({t.update(fmt::format("u{}.st", i), 0.5F * static_cast<float>(i) - 1.0F, ""), ""});
    }
    auto offered = fine;
    offered.insert(offered.begin() + 2, {t.update("nan.st", nan, ""), ""});
    offered.push_back({t.update("inf.st", -inf, ""), ""});
    for (const char* spec : {"fedavg", "fedadam", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1,2"}) {
      for (const bool clip : {false, true}) {
        CAPTURE(spec);
        CAPTURE(clip);
        RoundSettings settings;
        settings.strategy = parse_strategy(spec);
        if (clip) {
          settings.options.clip_norm = 1.0;
        }
        auto alone =
          validate_round(plan_standalone_round(base, t.in("alone.st"), std::nullopt), fine, OnBadUpdate::skip);
        const auto want = commit_round(alone, settings);
        auto with =
          validate_round(plan_standalone_round(base, t.in("with.st"), std::nullopt), offered, OnBadUpdate::skip);
        const auto got = commit_round(with, settings);
        CHECK(got.participants.size() == 5);
        REQUIRE(got.rejected.size() == 2);
        CHECK(got.rejected[0]["file"] == "nan.st");
        CHECK(got.rejected[1]["file"] == "inf.st");
        CHECK(read_flat(got.model) == read_flat(want.model));
        CHECK(got.info.selected == want.info.selected);
      }
    }
  }
}

TEST_CASE("round: a coordinator's ledger state advances over the new entries only, and refuses a rewritten past")
{
  const TestWorkspace t;
  LedgerState kept;
  for (int r = 1; r <= 3; ++r) {
    const std::vector<RoundCandidate> candidates{{t.update(fmt::format("a{}.st", r), 0.5F, "alice"), "alice"}};
    auto v = validate_round(plan_workspace_round(t.ws(), &kept), candidates, OnBadUpdate::fail);
    (void)commit_round(v, RoundSettings{});
  }
  const auto plan = plan_workspace_round(t.ws(), &kept);
  const auto fresh = plan_workspace_round(t.ws());
  CHECK(plan.round == 4);
  CHECK(plan.round == fresh.round);
  CHECK(plan.base == fresh.base);
  CHECK(plan.recorded_base_sha256 == fresh.recorded_base_sha256);
  CHECK(kept.model.round == LedgerState::read(t.ws()).model.round);

  const auto text = fedl::test::read_file(t.ws().ledger());
  SUBCASE("a line it already read, altered: refused, and the next read starts over")
  {
    auto altered = text;
    const auto at = altered.find("\"round\":1");
    REQUIRE(at != std::string::npos);
    altered[at + 8] = '7';
    fedl::test::write_file(t.ws().ledger(), altered);
    CHECK(message_of([&] { (void)plan_workspace_round(t.ws(), &kept); }).find("changed since this process verified") !=
          std::string::npos);
    // Started over: the whole ledger is verified again, and the altered line found.
    CHECK(message_of([&] { (void)plan_workspace_round(t.ws(), &kept); }).find("line") != std::string::npos);
  }
  SUBCASE("truncated: refused")
  {
    fedl::test::write_file(t.ws().ledger(), text.substr(0, text.size() / 2));
    CHECK_FALSE(message_of([&] { (void)plan_workspace_round(t.ws(), &kept); }).empty());
  }
}

TEST_CASE("round: an aggregate that is not finite is never written")
{
  const TestWorkspace t;
  auto plan = plan_workspace_round(t.ws());
  plan.limits.reset(); // as if fedl.json allowed anything
  const std::vector<RoundCandidate> candidates{{t.update("a.st", 3e38F, "alice"), "alice"},
                                               {t.update("b.st", 3e38F, "bob"), "bob"}};
  auto v = validate_round(plan, candidates, OnBadUpdate::fail);
  RoundSettings settings;
  settings.options.optimizer.lr = 10; // 3e39 is past float's range
  const auto before = snapshot(t.ws().root());
  CHECK(message_of([&] { commit_round(v, settings); }).find("is not finite") != std::string::npos);
  CHECK(snapshot(t.ws().root()) == before);
}

TEST_CASE("round: a rejection reason is valid UTF-8 and bounded, whatever the update quotes")
{
  const TestWorkspace t;
  t.rewrite(t.update("a.st", 1.0F, ""), "kind.st", "", [](Metadata& meta) {
    meta["fedl.kind"] = std::string(62, 'k') + "\xC3\xA9\xC3\xA9" + std::string(1 << 20, 'x');
  });
  const std::vector<RoundCandidate> candidates{{t.in("kind.st"), "alice"}, {t.update("b.st", 1.0F, "bob"), "bob"}};
  auto v = validate_round(plan_workspace_round(t.ws()), candidates, OnBadUpdate::skip);
  REQUIRE(v.rejected.size() == 1);
  const auto reason = v.rejected[0]["reason"].get<std::string>();
  CHECK(reason.size() < 200);
  CHECK(reason.find("fedl.kind is 'kkkk") != std::string::npos);
  CHECK(valid_utf8(reason) == reason);
  RoundSettings settings;
  (void)commit_round(v, settings); // the ledger takes it
  CHECK(read_workspace_ledger(t.ws()).back().body["rejected"][0]["reason"] == reason);
}

// Receipts live with the rounds here because they need a provisioned workspace and its ledger.
TEST_CASE("receipts: a site's signed heads catch a ledger rolled back or rewritten, and nothing else")
{
  const TestWorkspace t;
  const auto& ws = t.ws();
  const auto server = read_identity(ws.server_cert(), ws.server_key());
  const auto ca = certificate_fingerprint(read_certificate(ws.ca_cert()));
  const TempDir site;
  ReceiptLog log(site.path() / "receipts.jsonl");
  const auto take_head = [&] {
    const auto r = parse_receipt(signed_head(server, ledger_head(ws.ledger()), ca));
    REQUIRE(r);
    CHECK(verify_receipt(*r, server.cert));
    return *r;
  };
  CHECK_FALSE(log.add(take_head()));
  CHECK_FALSE(log.add(take_head())); // the same head again is not kept twice
  const std::vector<RoundCandidate> candidates{{t.update("a.st", 1.0F, "alice"), "alice"}};
  auto v = validate_round(plan_workspace_round(ws), candidates, OnBadUpdate::fail);
  (void)commit_round(v, RoundSettings{});
  CHECK_FALSE(log.add(take_head()));
  CHECK(read_receipts(site.path() / "receipts.jsonl").size() == 2);

  const auto witness = [&] {
    return message_of([&] {
      const auto entries = read_workspace_ledger(ws);
      const auto w = check_witness(site.path(), entries, ledger_head(ws.ledger()).sha256, server.cert, ca);
      CHECK(w.receipts == 2);
    });
  };
  CHECK(witness().empty());

  const auto text = fedl::test::read_file(ws.ledger());
  SUBCASE("rolled back: the last entry removed")
  {
    fedl::test::write_file(ws.ledger(), text.substr(0, text.rfind('\n', text.size() - 2) + 1));
    CHECK(witness().find("entries were removed from the end of the ledger") != std::string::npos);
  }
  SUBCASE("a forged receipt proves nothing and fails the audit")
  {
    auto r = take_head();
    r.sha256 = std::string(64, 'a');
    ReceiptLog(site.path() / "receipts.jsonl").add(r);
    CHECK(witness().find("signature does not verify") != std::string::npos);
  }
  SUBCASE("the coordinator showing a site an older head is reported to the site")
  {
    auto r = take_head();
    r.seq = 0;
    r.sha256 = std::string(64, 'b');
    const auto warning = log.add(r);
    REQUIRE(warning);
    CHECK(warning->find("was rewritten") != std::string::npos);
  }
  SUBCASE("a receipts file that is not one")
  {
    fedl::test::write_file(site.path() / "receipts.jsonl", "{\"seq\": -1}\n");
    CHECK(witness().find("line 1 is not a ledger receipt") != std::string::npos);
  }
}

TEST_CASE("revocations: a CRL from before a revocation the ledger records is refused")
{
  const TestWorkspace t;
  const auto old_crl = fedl::test::read_file(t.ws().crl());
  (void)revoke_client(t.ws(), "bob");
  CHECK_NOTHROW(check_revocations(t.ws(), read_workspace_ledger(t.ws())));
  fedl::test::write_file(t.ws().crl(), old_crl);
  CHECK(message_of([&] { check_revocations(t.ws(), read_workspace_ledger(t.ws())); }).find("does not list site bob") !=
        std::string::npos);
}

TEST_CASE("workspace: create_workspace makes the folder whole or not at all, and replaces only a workspace")
{
  TempDir tmp;
  const auto read_text = [](const fs::path& p) {
    std::ifstream in(p);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const auto target = tmp / "ws";
  const auto leftovers = [&] {
    std::size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(tmp.path())) {
      n += e.path().filename().string().starts_with(".ws.") ? 1 : 0;
    }
    return n;
  };
  // A fill that fails leaves nothing: no target, no staging folder.
  CHECK_THROWS_WITH(create_workspace(target, false,
                                     [](const Workspace& staging) {
                                       fedl::test::write_file(staging.config(), "{}");
                                       throw Error("disk full");
                                     }),
                    "disk full");
  CHECK_FALSE(std::filesystem::exists(target));
  CHECK(leftovers() == 0);

  create_workspace(target, false, [](const Workspace& staging) {
    fedl::test::write_file(staging.config(), "{}");
    fedl::test::write_file(staging.ledger(), "one");
  });
  CHECK(read_text(target / "ledger.jsonl") == "one");
  CHECK(leftovers() == 0);
  CHECK_THROWS_WITH_AS(create_workspace(target, false, [](const Workspace&) {}),
                       doctest::Contains("already exists; give --force"), UsageError);
  // Replacing: a failure keeps the old one; a success swaps it whole.
  CHECK_THROWS(create_workspace(target, true, [](const Workspace&) { throw Error("no"); }));
  CHECK(read_text(target / "ledger.jsonl") == "one");
  create_workspace(target, true, [](const Workspace& staging) {
    fedl::test::write_file(staging.config(), "{}");
    fedl::test::write_file(staging.ledger(), "two");
  });
  CHECK(read_text(target / "ledger.jsonl") == "two");
  CHECK(leftovers() == 0);
  // Never an arbitrary folder.
  std::filesystem::create_directories(tmp / "photos");
  fedl::test::write_file(tmp / "photos" / "a.jpg", "x");
  CHECK_THROWS_WITH_AS(check_can_create_workspace(tmp / "photos", true),
                       doctest::Contains("not a fedl workspace; --force only replaces a workspace"), UsageError);
  CHECK_NOTHROW(check_can_create_workspace(tmp / "new", false));
}
