// SPDX-License-Identifier: Apache-2.0
// The ledger's chain and signature checks, with a keyed-hash stand-in for the signer (the
// real Ed25519 signer is tested with the PKI and end to end with fedl audit).
#include "core/trust/ledger.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>

using namespace fedl::core;
using fedl::test::TempDir;

namespace {

std::string
mac(std::string_view payload)
{
  return sha256_hex(as_bytes("key:" + std::string(payload)));
}

const Signer k_sign = [](std::string_view p) { return mac(p); };
const Verifier k_verify = [](std::string_view p, const std::string& s) { return mac(p) == s; };

std::vector<std::string>
lines_of(const std::filesystem::path& p)
{
  std::vector<std::string> out;
  std::istringstream in(fedl::test::read_file(p));
  for (std::string l; std::getline(in, l);) {
    out.push_back(l);
  }
  return out;
}

void
write_lines(const std::filesystem::path& p, const std::vector<std::string>& lines)
{
  std::string s;
  for (const auto& l : lines) {
    s += l + "\n";
  }
  fedl::test::write_file(p, s);
}

std::string
verify_error(const std::filesystem::path& p)
{
  try {
    (void)read_ledger(p, k_verify);
  } catch (const VerifyError& e) {
    return e.what();
  }
  return "(verified)";
}

} // namespace

TEST_SUITE_BEGIN("ledger");

TEST_CASE("core::ledger chains and signs entries and reads them back")
{
  TempDir dir;
  const auto path = dir / "ledger.jsonl";
  append_ledger(path, "genesis", {{"model", "m0"}}, k_sign);
  append_ledger(path, "round", {{"round", 1}}, k_sign);
  const auto e = append_ledger(path, "round", {{"round", 2}}, k_sign);
  CHECK(e.seq == 2);
  const auto entries = read_ledger(path, k_verify);
  REQUIRE(entries.size() == 3);
  CHECK(entries[0].prev == std::string(64, '0'));
  CHECK(entries[1].prev == sha256_hex(as_bytes(lines_of(path)[0])));
  CHECK(entries[2].body["round"] == 2);
  CHECK(entries[2].line == 3);
}

TEST_CASE("core::ledger names the first broken line for every kind of tampering")
{
  TempDir dir;
  const auto path = dir / "ledger.jsonl";
  append_ledger(path, "genesis", {{"model", "m0"}}, k_sign);
  for (int r = 1; r <= 3; ++r) {
    append_ledger(path, "round", {{"round", r}, {"participants", {"a", "b"}}}, k_sign);
  }
  const auto good = lines_of(path);

  auto changed = good;
  changed[2].replace(changed[2].find("\"a\""), 3, "\"c\"");
  write_lines(path, changed);
  CHECK(verify_error(path).find("line 3: the signature does not verify") != std::string::npos);

  auto deleted = good;
  deleted.erase(deleted.begin() + 1);
  write_lines(path, deleted);
  CHECK(verify_error(path).find("line 2: sequence number 2 where 1 was expected") != std::string::npos);

  auto swapped = good;
  std::swap(swapped[1], swapped[2]);
  write_lines(path, swapped);
  CHECK(verify_error(path).find("line 2: sequence number") != std::string::npos);

  // A forger who rewrites seq and signature still breaks the chain.
  write_lines(path, {good[0], good[1]});
  append_ledger(path, "round", {{"round", 9}}, k_sign);
  auto forged = lines_of(path);
  forged.push_back(good[3]);
  write_lines(path, forged);
  CHECK(verify_error(path).find("line 4: prev does not match") != std::string::npos);

  write_lines(path, good);
  fedl::test::write_file(path, fedl::test::read_file(path) + "{\"seq\":4");
  CHECK(verify_error(path).find("line 5 is incomplete") != std::string::npos);
  CHECK_THROWS_AS(append_ledger(path, "round", {}, k_sign), VerifyError);

  write_lines(path, good);
  const Verifier other_key = [](std::string_view p, const std::string& s) {
    return sha256_hex(as_bytes("other:" + std::string(p))) == s;
  };
  try {
    (void)read_ledger(path, other_key);
    FAIL("verified with another key");
  } catch (const VerifyError& e) {
    CHECK(std::string(e.what()).find("line 1: the signature does not verify") != std::string::npos);
  }
  CHECK_THROWS_AS(read_ledger(dir / "missing.jsonl", k_verify), VerifyError);
}

TEST_SUITE_END();

TEST_CASE("ledger: a line in any other JSON form than the canonical one is refused, though it says the same")
{
  const TempDir dir;
  const auto path = dir / "ledger.jsonl";
  append_ledger(path, "genesis", {{"a", 1}}, k_sign);
  append_ledger(path, "round", {{"site", "caf\xC3\xA9"}, {"n", 2}}, k_sign);
  REQUIRE(verify_error(path) == "(verified)");
  const auto lines = lines_of(path);
  const auto entry = nlohmann::json::parse(lines[1]);
  std::string rewritten;
  SUBCASE("keys reordered")
  {
    nlohmann::ordered_json o;
    for (const char* key : {"time", "sig", "seq", "prev", "kind", "body"}) {
      o[key] = entry[key];
    }
    rewritten = o.dump();
  }
  SUBCASE("a \\u escape instead of UTF-8")
  {
    rewritten = entry.dump(-1, ' ', true);
  }
  SUBCASE("a space")
  {
    rewritten = "{ " + lines[1].substr(1);
  }
  SUBCASE("a key twice (a JSON reader keeps one of them)")
  {
    rewritten = "{\"kind\":\"round\"," + lines[1].substr(1);
  }
  REQUIRE(rewritten != lines[1]);
  // The signature covers the parsed object, so each of these verified before.
  CHECK(k_verify(ledger_signed_payload([&] {
                   auto j = nlohmann::json::parse(rewritten);
                   j.erase("sig");
                   return j;
                 }()),
                 entry["sig"].get<std::string>()));
  write_lines(path, {lines[0], rewritten});
  CHECK(verify_error(path).find("line 2: not in canonical form") != std::string::npos);
}

TEST_CASE("ledger: a line nested deeper than any entry is refused before it is parsed")
{
  const TempDir dir;
  const auto path = dir / "ledger.jsonl";
  append_ledger(path, "genesis", {{"a", 1}}, k_sign);
  const auto lines = lines_of(path);
  write_lines(path, {lines[0], std::string(100000, '[') + std::string(100000, ']')});
  CHECK(verify_error(path).find("line 2: nests deeper than") != std::string::npos);
}

TEST_CASE("ledger: text that is not valid UTF-8 cannot make an append fail")
{
  const TempDir dir;
  const auto path = dir / "ledger.jsonl";
  append_ledger(path, "genesis", {{"a", 1}}, k_sign);
  append_ledger(path, "round", {{"reason", std::string("cut \xC3")}}, k_sign);
  const auto entries = read_ledger(path, k_verify);
  CHECK(entries.back().body["reason"] == "cut \xEF\xBF\xBD");
  const auto head = ledger_head(path);
  CHECK(head.seq == 1);
  CHECK(head.sha256 == sha256_hex(as_bytes(lines_of(path)[1])));
}
