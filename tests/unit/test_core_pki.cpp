// SPDX-License-Identifier: Apache-2.0
#include "core/trust/pki.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "testutil.hpp"

#include <doctest/doctest.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>

using namespace fedl::core;
using fedl::test::TempDir;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// A CA with one coordinator (SANs localhost and 127.0.0.1) and one site.
struct Federation
{
  Identity ca = create_ca("fedl federation CA test", {.days = 3650});
  Identity server = issue_server_certificate(ca, std::vector<std::string>{"localhost", "127.0.0.1"}, {.days = 365});
  Identity client = issue_client_certificate(ca, "site-1", {.days = 365});
};

// The SHA-256 of the certificate's DER, encoded here independently of certificate_fingerprint.
std::string
der_sha256(const Cert& cert)
{
  unsigned char* der = nullptr;
  const int len = i2d_X509(cert.get(), &der);
  REQUIRE(len > 0);
  std::string hex = sha256_hex(std::as_bytes(std::span(der, static_cast<std::size_t>(len))));
  OPENSSL_free(der);
  return hex;
}

std::string
to_base64(const std::string& bytes)
{
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

std::string
from_base64(const std::string& text)
{
  std::string out(text.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  REQUIRE(n >= 0);
  const auto pad = static_cast<std::size_t>(std::count(text.end() - 2, text.end(), '='));
  out.resize(static_cast<std::size_t>(n) - pad);
  return out;
}

unsigned
mode_of(const fs::path& path)
{
  struct stat st
  {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

bool
contains(const std::string& haystack, std::string_view needle)
{
  return haystack.find(needle) != std::string::npos;
}

// Runs a shell command; returns its exit status and its stdout and stderr together.
std::pair<int, std::string>
shell(const std::string& command)
{
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) {
    out.append(buf, n);
  }
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string
quoted(const fs::path& path)
{
  return "'" + path.string() + "'";
}

// Asserts that `f` throws an exception of type E whose message contains `needle`.
template<typename E, typename F>
void
check_throws_naming(F&& f, const std::string& needle)
{
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    INFO(e.what());
    CHECK(contains(e.what(), needle));
  }
  CHECK_MESSAGE(thrown, "expected an exception naming ", needle);
}

} // namespace

TEST_SUITE_BEGIN("pki");

TEST_CASE("core::pki issues a CA, a server and a client certificate with the expected facts")
{
  const auto from = std::chrono::system_clock::now();
  const Identity ca = create_ca("fedl federation CA test", {.days = 3650, .from = from});
  const std::vector<std::string> names{"localhost", "127.0.0.1"};
  const Identity server = issue_server_certificate(ca, names, {.days = 365, .from = from});
  const Identity client = issue_client_certificate(ca, "site-1", {.days = 30, .from = from});

  const auto ca_info = certificate_info(ca.cert);
  const auto server_info = certificate_info(server.cert);
  const auto client_info = certificate_info(client.cert);

  CHECK(ca_info.common_name == "fedl federation CA test");
  CHECK(ca_info.issuer_common_name == "fedl federation CA test");
  CHECK(ca_info.is_ca);
  CHECK(ca_info.subject_alt_names.empty());

  CHECK(server_info.common_name == "localhost");
  CHECK(server_info.issuer_common_name == "fedl federation CA test");
  CHECK_FALSE(server_info.is_ca);
  CHECK(server_info.subject_alt_names == names);

  CHECK(client_info.common_name == "site-1");
  CHECK_FALSE(client_info.is_ca);
  CHECK(client_info.subject_alt_names.empty());

  // Fingerprints are the SHA-256 of the DER, and survive a PEM round trip.
  CHECK(server_info.fingerprint == der_sha256(server.cert));
  CHECK(client_info.fingerprint == der_sha256(client.cert));
  CHECK(ca_info.fingerprint == der_sha256(ca.cert));
  CHECK(certificate_fingerprint(server.cert) == server_info.fingerprint);
  CHECK(certificate_fingerprint(certificate_from_pem(to_pem(server.cert), "server")) == server_info.fingerprint);
  CHECK(server_info.fingerprint.size() == 64);

  // 128-bit random positive serials: 16 bytes, lowercase hex, all different.
  const std::set<std::string> serials{ca_info.serial, server_info.serial, client_info.serial};
  CHECK(serials.size() == 3);
  for (const auto& s : serials) {
    CHECK(s.size() == 32);
    CHECK(std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }));
  }

  // Validity: notBefore 5 minutes before issue, notAfter `days` after.
  const auto secs = [](TimePoint t) { return std::chrono::floor<std::chrono::seconds>(t); };
  CHECK(secs(client_info.not_before) == secs(from - k_clock_skew));
  CHECK(secs(client_info.not_after) == secs(from + std::chrono::days(30)));
  CHECK(secs(ca_info.not_after) == secs(from + std::chrono::days(3650)));

  CHECK(key_matches(server.cert, server.key));
  CHECK_FALSE(key_matches(server.cert, client.key));
}

TEST_CASE("core::pki takes IPv4, IPv6 and DNS server names and refuses names no certificate can carry")
{
  const Identity ca = create_ca("fedl federation CA names", {.days = 10});
  const std::vector<std::string> names{"[::1]", "coord.example.org", "*.example.org", "10.0.0.1.nip.io", "fe80::1"};
  const auto info = certificate_info(issue_server_certificate(ca, names, {.days = 10}).cert);
  CHECK(info.common_name == "::1");
  CHECK(info.subject_alt_names ==
        std::vector<std::string>{"::1", "coord.example.org", "*.example.org", "10.0.0.1.nip.io", "fe80::1"});

  const std::vector<std::string> bad_names{
    "",     "a,b",         "exa mple.org", "1.2.3.999", "-x.org",
    "a..b", "[127.0.0.1]", "x.*.org",      "host.",     std::string(64, 'a') + ".org"};
  for (const auto& bad : bad_names) {
    CAPTURE(bad);
    CHECK_THROWS_AS(issue_server_certificate(ca, std::vector<std::string>{bad}, {.days = 10}), UsageError);
  }
  CHECK_THROWS_AS(issue_server_certificate(ca, std::vector<std::string>{}, {.days = 10}), UsageError);
  CHECK_THROWS_AS(issue_client_certificate(ca, "", {.days = 10}), UsageError);
  CHECK_THROWS_AS(issue_client_certificate(ca, "site\n1", {.days = 10}), UsageError);
  CHECK_THROWS_AS(issue_client_certificate(ca, std::string(65, 's'), {.days = 10}), UsageError);
  CHECK(certificate_info(issue_client_certificate(ca, std::string(64, 's'), {.days = 10}).cert).common_name ==
        std::string(64, 's'));
  CHECK(certificate_info(issue_client_certificate(ca, "Klinik Zürich", {.days = 10}).cert).common_name ==
        "Klinik Zürich");
  CHECK_THROWS_AS(create_ca("ca", {.days = 0}), UsageError);
  CHECK_THROWS_AS(create_ca("ca", {.days = 36501}), UsageError);
  CHECK_THROWS_AS(issue_client_certificate(ca, "site", {.days = -1}), UsageError);
}

TEST_CASE("core::pki writes keys 0600 and certificates atomically, and reads them back")
{
  TempDir dir;
  const Federation fed;
  const fs::path pki = dir / "pki";
  fs::create_directory(pki);
  fs::permissions(pki, fs::perms(0751));
  // With no umask at all, a careless writer would make the key world-readable.
  const mode_t old_umask = ::umask(0);
  write_private_key(pki / "server.key", fed.server.key);
  write_certificate(pki / "server.crt", fed.server.cert);
  write_private_key(pki / "server.key", fed.server.key); // replacing keeps 0600
  ::umask(old_umask);

  CHECK(mode_of(pki / "server.key") == 0600);
  CHECK(mode_of(pki / "server.crt") == 0644);
  CHECK(mode_of(pki) == 0751);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(pki)) {
    files.push_back(e.path().filename().string());
  }
  std::sort(files.begin(), files.end());
  CHECK(files == std::vector<std::string>{"server.crt", "server.key"}); // no temporary left behind

  const std::string key_pem = fedl::test::read_file(pki / "server.key");
  CHECK(contains(key_pem, "-----BEGIN PRIVATE KEY-----"));
  CHECK(contains(fedl::test::read_file(pki / "server.crt"), "-----BEGIN CERTIFICATE-----"));

  const Identity back = read_identity(pki / "server.crt", pki / "server.key");
  CHECK(certificate_fingerprint(back.cert) == certificate_fingerprint(fed.server.cert));
  const std::string sig = sign(back.key, as_bytes("hello"));
  CHECK(verify_signature(fed.server.cert, as_bytes("hello"), sig));
  CHECK(sig == sign(fed.server.key, as_bytes("hello"))); // Ed25519 is deterministic

  // A key that belongs to another certificate.
  write_private_key(pki / "client.key", fed.client.key);
  check_throws_naming<VerifyError>([&] { read_identity(pki / "server.crt", pki / "client.key"); },
                                   (pki / "client.key").string());

  // Unwritable places are an Error (exit 1) naming the path.
  try {
    write_private_key(dir / "missing" / "x.key", fed.client.key);
    FAIL("expected an Error");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::failure);
    CHECK(contains(e.what(), (dir / "missing" / "x.key").string()));
  }
  CHECK_THROWS_AS(write_certificate(dir / "missing" / "x.crt", fed.client.cert), Error);
}

TEST_CASE("core::pki reading a corrupt or wrong PEM file throws VerifyError naming the file")
{
  TempDir dir;
  const Federation fed;
  write_certificate(dir / "ca.crt", fed.ca.cert);
  write_private_key(dir / "ca.key", fed.ca.key);
  write_crl(dir / "crl.pem", create_crl(fed.ca, {}, 1, {.days = 30}));

  const std::string pem = to_pem(fed.server.cert);
  fedl::test::write_file(dir / "garbage.crt", "hello, this is not a certificate\n");
  fedl::test::write_file(dir / "truncated.crt", pem.substr(0, pem.size() / 2));
  std::string damaged = pem;
  damaged.replace(damaged.find('\n') + 1, 8, "!!!!!!!!");
  fedl::test::write_file(dir / "damaged.crt", damaged);
  fedl::test::write_file(dir / "empty.crt", "");

  for (const char* name : {"garbage.crt", "truncated.crt", "damaged.crt", "empty.crt", "ca.key", "crl.pem"}) {
    CAPTURE(name);
    check_throws_naming<VerifyError>([&] { read_certificate(dir / name); }, (dir / name).string());
  }
  for (const char* name : {"garbage.crt", "ca.crt", "crl.pem"}) {
    CAPTURE(name);
    check_throws_naming<VerifyError>([&] { read_private_key(dir / name); }, (dir / name).string());
  }
  for (const char* name : {"garbage.crt", "ca.crt", "ca.key"}) {
    CAPTURE(name);
    check_throws_naming<VerifyError>([&] { read_crl(dir / name); }, (dir / name).string());
  }
  CHECK_THROWS_AS(certificate_from_pem("nonsense", "the peer"), VerifyError);
  CHECK(ERR_peek_error() == 0); // failures leave no stale OpenSSL errors behind for a TLS call

  // An encrypted key is refused at once, without prompting for a passphrase.
  {
    BIO* bio = BIO_new(BIO_s_mem());
    REQUIRE(PEM_write_bio_PrivateKey(bio, fed.ca.key.get(), EVP_aes_256_cbc(),
                                     reinterpret_cast<const unsigned char*>("secret"), 6, nullptr, nullptr) == 1);
    char* data = nullptr;
    const long len = BIO_get_mem_data(bio, &data);
    fedl::test::write_file(dir / "encrypted.key", std::string(data, static_cast<std::size_t>(len)));
    BIO_free(bio);
    check_throws_naming<VerifyError>([&] { read_private_key(dir / "encrypted.key"); },
                                     (dir / "encrypted.key").string() + " is an encrypted private key");
  }

  // A missing file is a run-time failure (exit 1), not a verification failure.
  try {
    read_certificate(dir / "absent.crt");
    FAIL("expected an Error");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::failure);
    CHECK(contains(e.what(), (dir / "absent.crt").string()));
  }

  // The good files read back.
  CHECK(certificate_fingerprint(read_certificate(dir / "ca.crt")) == certificate_fingerprint(fed.ca.cert));
  CHECK(key_matches(fed.ca.cert, read_private_key(dir / "ca.key")));
  CHECK(crl_info(read_crl(dir / "crl.pem")).number == 1);
}

TEST_CASE("core::pki verifies certificates against the federation CA only")
{
  const Federation fed;
  CHECK(verify_certificate(fed.server.cert, fed.ca.cert, nullptr, CertPurpose::server));
  CHECK(verify_certificate(fed.client.cert, fed.ca.cert, nullptr, CertPurpose::client));
  CHECK(verify_certificate(fed.server.cert, fed.ca.cert, nullptr, CertPurpose::any));
  CHECK(verify_certificate(fed.client.cert, fed.ca.cert, nullptr, CertPurpose::any));

  // A site's certificate cannot pose as the coordinator, nor the other way round.
  const auto as_server = verify_certificate(fed.client.cert, fed.ca.cert, nullptr, CertPurpose::server);
  CHECK_FALSE(as_server.ok);
  CHECK(contains(as_server.reason, "not meant for a coordinator"));
  CHECK_FALSE(verify_certificate(fed.server.cert, fed.ca.cert, nullptr, CertPurpose::client));

  // Another federation's certificates, even from a CA with the very same name.
  const Identity other_ca = create_ca("fedl federation CA other", {.days = 3650});
  const Identity foreign = issue_client_certificate(other_ca, "site-1", {.days = 365});
  const auto verdict = verify_certificate(foreign.cert, fed.ca.cert, nullptr, CertPurpose::client);
  CHECK_FALSE(verdict.ok);
  CHECK(verdict.reason == "not issued by this federation's CA");

  const Identity twin_ca = create_ca("fedl federation CA test", {.days = 3650});
  const Identity twin = issue_client_certificate(twin_ca, "site-1", {.days = 365});
  const auto twin_verdict = verify_certificate(twin.cert, fed.ca.cert, nullptr, CertPurpose::client);
  CHECK_FALSE(twin_verdict.ok);
  CHECK(contains(twin_verdict.reason, "this federation's CA"));

  // A self-signed impostor and the other CA itself.
  CHECK(verify_certificate(other_ca.cert, fed.ca.cert, nullptr, CertPurpose::any).reason ==
        "not issued by this federation's CA");
  CHECK(describe_verify_error(X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY) == "not issued by this federation's CA");
}

TEST_CASE("core::pki revokes through a CRL that the CA signs")
{
  TempDir dir;
  const Federation fed;
  const Crl crl0 = create_crl(fed.ca, {}, 1, {.days = 30});
  const auto info0 = crl_info(crl0);
  CHECK(info0.number == 1);
  CHECK(info0.revoked.empty());
  CHECK(info0.next_update > std::chrono::system_clock::now() + std::chrono::days(29));
  CHECK(crl_signed_by(crl0, fed.ca.cert));
  CHECK(verify_certificate(fed.client.cert, fed.ca.cert, &crl0, CertPurpose::client));
  CHECK(verify_certificate(fed.server.cert, fed.ca.cert, &crl0, CertPurpose::server));

  const auto client_serial = certificate_info(fed.client.cert).serial;
  const auto when = std::chrono::floor<std::chrono::seconds>(std::chrono::system_clock::now());
  const std::vector<Revocation> add{{client_serial, when}};
  const Crl crl1 = update_crl(fed.ca, crl0, add, {.days = 30});
  const auto info1 = crl_info(crl1);
  CHECK(info1.number == 2);
  REQUIRE(info1.revoked.size() == 1);
  CHECK(info1.revoked[0].serial == client_serial);
  CHECK(info1.revoked[0].time == when);
  CHECK(is_revoked(crl1, fed.client.cert));
  CHECK_FALSE(is_revoked(crl1, fed.server.cert));
  CHECK_FALSE(is_revoked(crl0, fed.client.cert));

  const auto verdict = verify_certificate(fed.client.cert, fed.ca.cert, &crl1, CertPurpose::client);
  CHECK_FALSE(verdict.ok);
  CHECK(contains(verdict.reason, "revoked"));
  CHECK(contains(verdict.reason, client_serial));
  CHECK(verify_certificate(fed.server.cert, fed.ca.cert, &crl1, CertPurpose::server));
  CHECK(verify_certificate(fed.client.cert, fed.ca.cert, nullptr, CertPurpose::client)); // without the CRL

  // Revoking again lists the serial once; uppercase hex (as openssl prints) is the same serial.
  std::string upper = client_serial;
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
  const std::vector<Revocation> again{{upper, when + 1h}};
  const Crl crl2 = update_crl(fed.ca, crl1, again, {.days = 30});
  CHECK(crl_info(crl2).number == 3);
  CHECK(crl_info(crl2).revoked.size() == 1);

  // Written and read back, the CRL says the same and still verifies.
  write_crl(dir / "crl.pem", crl2);
  const Crl back = read_crl(dir / "crl.pem");
  CHECK(crl_signed_by(back, fed.ca.cert));
  CHECK(crl_info(back).revoked[0].serial == client_serial);
  CHECK_FALSE(verify_certificate(fed.client.cert, fed.ca.cert, &back, CertPurpose::client));

  // Another CA's CRL neither counts nor can be extended with this CA.
  const Identity other_ca = create_ca("fedl federation CA other", {.days = 3650});
  const Crl foreign = create_crl(other_ca, add, 7, {.days = 30});
  CHECK_FALSE(crl_signed_by(foreign, fed.ca.cert));
  CHECK_THROWS_AS(update_crl(fed.ca, foreign, add, {.days = 30}), VerifyError);
  const auto no_crl = verify_certificate(fed.server.cert, fed.ca.cert, &foreign, CertPurpose::server);
  CHECK_FALSE(no_crl.ok);
  CHECK(contains(no_crl.reason, "CRL"));

  const std::vector<Revocation> bad{{"not-hex", when}};
  CHECK_THROWS_AS(create_crl(fed.ca, bad, 1, {.days = 30}), UsageError);
}

TEST_CASE("core::pki rejects expired certificates and tolerates an aged CRL")
{
  const auto now = std::chrono::system_clock::now();
  const Federation fed;
  const auto month_ago = now - std::chrono::days(30);
  const Identity expired = issue_client_certificate(fed.ca, "site-old", {.days = 1, .from = month_ago});
  const auto verdict = verify_certificate(expired.cert, fed.ca.cert, nullptr, CertPurpose::client);
  CHECK_FALSE(verdict.ok);
  CHECK(contains(verdict.reason, "certificate has expired"));
  CHECK(contains(verdict.reason, "notAfter"));
  // It was valid at the time, under a CA that was valid then: what fedl audit asks of an old
  // ledger entry. (fed.ca did not exist yet at that time.)
  const auto then = now - std::chrono::days(30) + 1h;
  CHECK(contains(verify_certificate(expired.cert, fed.ca.cert, nullptr, CertPurpose::client, then).reason,
                 "CA's certificate is not valid yet"));
  const Identity long_ca = create_ca("fedl federation CA long", {.days = 3650, .from = now - std::chrono::days(60)});
  const Identity was_valid = issue_client_certificate(long_ca, "site-old", {.days = 1, .from = month_ago});
  CHECK_FALSE(verify_certificate(was_valid.cert, long_ca.cert, nullptr, CertPurpose::client));
  CHECK(verify_certificate(was_valid.cert, long_ca.cert, nullptr, CertPurpose::client, then));

  const auto soon = now + std::chrono::days(2);
  const Identity future = issue_client_certificate(fed.ca, "site-new", {.days = 10, .from = soon});
  CHECK(contains(verify_certificate(future.cert, fed.ca.cert, nullptr, CertPurpose::client).reason, "not valid yet"));

  // An expired CA makes every certificate fail, and the message says it is the CA.
  const Identity old_ca = create_ca("fedl federation CA old", {.days = 1, .from = now - std::chrono::days(30)});
  const Identity leaf = issue_client_certificate(old_ca, "site-1", {.days = 365});
  const auto ca_verdict = verify_certificate(leaf.cert, old_ca.cert, nullptr, CertPurpose::client);
  CHECK_FALSE(ca_verdict.ok);
  CHECK(contains(ca_verdict.reason, "CA"));
  CHECK(contains(ca_verdict.reason, "expired"));

  // A CRL past its nextUpdate still revokes what it lists, and does not lock everyone else out.
  const std::vector<Revocation> add{{certificate_info(fed.client.cert).serial, now - std::chrono::days(30)}};
  const Crl aged = create_crl(fed.ca, add, 1, {.days = 1, .from = now - std::chrono::days(30)});
  CHECK(crl_info(aged).next_update < now);
  CHECK(verify_certificate(fed.server.cert, fed.ca.cert, &aged, CertPurpose::server));
  CHECK(contains(verify_certificate(fed.client.cert, fed.ca.cert, &aged, CertPurpose::client).reason, "revoked"));
}

TEST_CASE("core::pki Ed25519 signatures verify and fail on any change")
{
  const Federation fed;
  const std::string message = "{\"kind\":\"round\",\"seq\":1}";
  const std::string sig = sign(fed.server.key, as_bytes(message));
  CHECK(sig.size() == 88); // 64 bytes in base64
  CHECK(from_base64(sig).size() == 64);
  CHECK(verify_signature(fed.server.cert, as_bytes(message), sig));
  CHECK(verify_signature(fed.server.key, as_bytes(message), sig));

  // One byte of the message.
  for (std::size_t i : {std::size_t{0}, message.size() / 2, message.size() - 1}) {
    std::string changed = message;
    changed[i] = static_cast<char>(changed[i] ^ 0x01);
    CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(changed), sig));
  }
  CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(message + " "), sig));
  CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(""), sig));

  // One byte of the signature, in its bytes and in its text.
  const std::string raw = from_base64(sig);
  for (std::size_t i : {std::size_t{0}, std::size_t{31}, std::size_t{32}, std::size_t{63}}) {
    std::string changed = raw;
    changed[i] = static_cast<char>(changed[i] ^ 0x80);
    CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(message), to_base64(changed)));
  }
  std::string text_changed = sig;
  text_changed[10] = text_changed[10] == 'A' ? 'B' : 'A';
  CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(message), text_changed));

  // Another key.
  CHECK_FALSE(verify_signature(fed.client.cert, as_bytes(message), sig));
  CHECK_FALSE(verify_signature(fed.ca.key, as_bytes(message), sig));

  // Malformed base64 is false, never an exception; so is a second spelling of the same bytes.
  std::string non_canonical = sig;
  non_canonical[85] = static_cast<char>(non_canonical[85] + 1); // the last digit carries 2 unused bits
  CHECK(from_base64(non_canonical) == raw);
  const std::vector<std::string> bad_signatures{"",
                                                "abc",
                                                "!!!!",
                                                sig + "=",
                                                sig + "====",
                                                sig.substr(0, 86),
                                                sig + "\n",
                                                " " + sig,
                                                std::string(88, '='),
                                                non_canonical,
                                                "AAAA",
                                                to_base64(raw.substr(0, 63))};
  for (const auto& bad : bad_signatures) {
    CAPTURE(bad);
    CHECK_FALSE(verify_signature(fed.server.cert, as_bytes(message), bad));
  }
  CHECK_FALSE(verify_signature(Cert{}, as_bytes(message), sig));
  CHECK(ERR_peek_error() == 0);

  // The empty message and a large one.
  CHECK(verify_signature(fed.client.cert, as_bytes(""), sign(fed.client.key, as_bytes(""))));
  const std::string big(1 << 20, 'x');
  CHECK(verify_signature(fed.client.cert, as_bytes(big), sign(fed.client.key, as_bytes(big))));
}

TEST_CASE("core::pki certificates and CRL pass the openssl command-line tool's checks")
{
  if (std::system("command -v openssl >/dev/null 2>&1") != 0) {
    MESSAGE("openssl is not installed: skipping the independent check");
    return;
  }
  TempDir dir;
  const Federation fed;
  write_certificate(dir / "ca.crt", fed.ca.cert);
  write_certificate(dir / "server.crt", fed.server.cert);
  write_certificate(dir / "client.crt", fed.client.cert);
  write_private_key(dir / "server.key", fed.server.key);
  const std::vector<Revocation> add{{certificate_info(fed.client.cert).serial, std::chrono::system_clock::now()}};
  write_crl(dir / "crl.pem", update_crl(fed.ca, create_crl(fed.ca, {}, 1, {.days = 30}), add, {.days = 30}));
  const std::string ca = quoted(dir / "ca.crt");
  const std::string crl = quoted(dir / "crl.pem");
  const std::string server = quoted(dir / "server.crt");
  const std::string client = quoted(dir / "client.crt");

  auto [rc, out] = shell("openssl verify -x509_strict -purpose sslserver -CAfile " + ca + " " + server);
  INFO(out);
  CHECK(rc == 0);
  CHECK(contains(out, ": OK"));
  std::tie(rc, out) = shell("openssl verify -x509_strict -purpose sslclient -CAfile " + ca + " " + client);
  CHECK(rc == 0);
  std::tie(rc, out) = shell("openssl verify -crl_check -CAfile " + ca + " -CRLfile " + crl + " " + server);
  CHECK(rc == 0);
  std::tie(rc, out) = shell("openssl verify -crl_check -CAfile " + ca + " -CRLfile " + crl + " " + client);
  CHECK(rc != 0);
  CHECK(contains(out, "certificate revoked"));
  std::tie(rc, out) = shell("openssl verify -purpose sslserver -CAfile " + ca + " " + client);
  CHECK(rc != 0);
  std::tie(rc, out) = shell("openssl crl -noout -text -CAfile " + ca + " -in " + crl);
  CHECK(rc == 0);
  CHECK(contains(out, "verify OK"));
  CHECK(contains(out, "X509v3 CRL Number"));

  // Fingerprint, serial and SANs as openssl reads them.
  std::tie(rc, out) = shell("openssl x509 -noout -fingerprint -sha256 -serial -ext subjectAltName -in " + server);
  CHECK(rc == 0);
  const auto info = certificate_info(fed.server.cert);
  std::string fp;
  for (std::size_t i = out.find('=') + 1; i < out.size() && out[i] != '\n'; ++i) {
    if (out[i] != ':') {
      fp += static_cast<char>(std::tolower(static_cast<unsigned char>(out[i])));
    }
  }
  CHECK(fp == info.fingerprint);
  std::string serial = info.serial;
  std::transform(serial.begin(), serial.end(), serial.begin(), [](unsigned char c) { return std::toupper(c); });
  CHECK(contains(out, "serial=" + serial));
  CHECK(contains(out, "DNS:localhost, IP Address:127.0.0.1"));

  // The key file is a PEM key openssl reads, and a signature made here verifies there.
  const std::string message = "ledger entry bytes";
  fedl::test::write_file(dir / "msg", message);
  fedl::test::write_file(dir / "msg.sig", from_base64(sign(fed.server.key, as_bytes(message))));
  std::tie(rc, out) = shell("openssl pkeyutl -verify -rawin -certin -inkey " + server + " -in " + quoted(dir / "msg") +
                            " -sigfile " + quoted(dir / "msg.sig"));
  CHECK(rc == 0);
  CHECK(contains(out, "Signature Verified Successfully"));
  std::tie(rc, out) = shell("openssl pkey -noout -text -in " + quoted(dir / "server.key"));
  CHECK(rc == 0);
  CHECK(contains(out, "ED25519 Private-Key"));
}

TEST_SUITE_END();

TEST_CASE("core::share_certificate: another owner of the same certificate outlives the first")
{
  Identity ca = create_ca("fedl federation CA test", {.days = 30});
  const auto fingerprint = certificate_fingerprint(ca.cert);
  auto shared = share_certificate(ca.cert);
  ca.cert.reset();
  REQUIRE(shared);
  CHECK(certificate_fingerprint(shared) == fingerprint);
  CHECK_FALSE(share_certificate(Cert{}));
}
