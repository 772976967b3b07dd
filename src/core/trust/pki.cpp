// SPDX-License-Identifier: Apache-2.0
#include "core/trust/pki.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <arpa/inet.h>
#include <fmt/chrono.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>
#include <set>

namespace fs = std::filesystem;

namespace fedl::core {

void
PKeyDeleter::operator()(EVP_PKEY* p) const noexcept
{
  EVP_PKEY_free(p);
}

void
CertDeleter::operator()(X509* p) const noexcept
{
  X509_free(p);
}

void
CrlDeleter::operator()(X509_CRL* p) const noexcept
{
  X509_CRL_free(p);
}

void
TrustStoreDeleter::operator()(X509_STORE* p) const noexcept
{
  X509_STORE_free(p);
}

namespace {

// unique_ptr for the OpenSSL objects that only this file handles.
template<auto Free>
struct FreeWith
{
  template<typename T>
  void operator()(T* p) const noexcept
  {
    Free(p);
  }
};
template<typename T, auto Free>
using Owned = std::unique_ptr<T, FreeWith<Free>>;

using BioPtr = Owned<BIO, BIO_free_all>;
using BignumPtr = Owned<BIGNUM, BN_free>;
using IntegerPtr = Owned<ASN1_INTEGER, ASN1_INTEGER_free>;
using TimePtr = Owned<ASN1_TIME, ASN1_TIME_free>;
using OctetsPtr = Owned<ASN1_OCTET_STRING, ASN1_OCTET_STRING_free>;
using NamePtr = Owned<X509_NAME, X509_NAME_free>;
using ExtensionPtr = Owned<X509_EXTENSION, X509_EXTENSION_free>;
using GeneralNamesPtr = Owned<GENERAL_NAMES, GENERAL_NAMES_free>;
using AuthorityKeyIdPtr = Owned<AUTHORITY_KEYID, AUTHORITY_KEYID_free>;
using RevokedPtr = Owned<X509_REVOKED, X509_REVOKED_free>;
using StoreCtxPtr = Owned<X509_STORE_CTX, X509_STORE_CTX_free>;
using MdCtxPtr = Owned<EVP_MD_CTX, EVP_MD_CTX_free>;

// Empties OpenSSL's per-thread error queue on entry and on every way out of a public function,
// so that errors neither leak into a later, unrelated OpenSSL call nor get blamed on this one.
class ErrorQueueGuard
{
public:
  ErrorQueueGuard() { ERR_clear_error(); }
  ErrorQueueGuard(const ErrorQueueGuard&) = delete;
  ErrorQueueGuard& operator=(const ErrorQueueGuard&) = delete;
  ~ErrorQueueGuard() { ERR_clear_error(); }
};

// The reason of the earliest queued OpenSSL error (the root cause), and an empty queue.
std::string
openssl_reason()
{
  const unsigned long first = ERR_get_error();
  while (ERR_get_error() != 0) {
  }
  if (first == 0) {
    return "unknown OpenSSL error";
  }
  const char* reason = ERR_reason_error_string(first);
  return reason != nullptr ? std::string(reason) : fmt::format("OpenSSL error {:#x}", first);
}

// Throws Error for an OpenSSL failure that only resource exhaustion or a bug can cause.
[[noreturn]] void
fail(std::string_view what)
{
  throw Error("OpenSSL: cannot {}: {}", what, openssl_reason());
}

template<typename T>
T*
check(T* p, std::string_view what)
{
  if (p == nullptr) {
    fail(what);
  }
  return p;
}

void
check(int rc, std::string_view what)
{
  if (rc <= 0) {
    fail(what);
  }
}

std::time_t
to_time_t(TimePoint t)
{
  return std::chrono::system_clock::to_time_t(t);
}

TimePoint
to_time_point(const ASN1_TIME* t, std::string_view what)
{
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) {
    throw VerifyError("{} has a malformed time field", what);
  }
  return std::chrono::system_clock::from_time_t(::timegm(&tm));
}

std::string
format_utc(std::time_t t)
{
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", fmt::gmtime(t));
}

TimePtr
make_time(std::time_t t)
{
  return TimePtr(check(ASN1_TIME_set(nullptr, t), "encode a time"));
}

void
check_validity(const Validity& v)
{
  if (v.days < 1 || v.days > 36500) {
    throw UsageError("a validity must be 1 to 36500 days, not {}", v.days);
  }
}

std::time_t
start_of(const Validity& v)
{
  return to_time_t(v.from - k_clock_skew);
}

std::time_t
end_of(const Validity& v)
{
  return to_time_t(v.from) + static_cast<std::time_t>(v.days) * 86400;
}

std::string
lower(std::string s)
{
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string
serial_hex(const ASN1_INTEGER* serial)
{
  const BignumPtr bn(check(ASN1_INTEGER_to_BN(serial, nullptr), "decode a serial number"));
  char* hex = check(BN_bn2hex(bn.get()), "format a serial number");
  std::string out = lower(hex);
  OPENSSL_free(hex);
  return out;
}

// A serial given as hex text (CertificateInfo::serial, or openssl's uppercase form).
IntegerPtr
parse_serial(std::string_view hex)
{
  const bool valid = !hex.empty() && hex.size() <= 40 &&
                     std::all_of(hex.begin(), hex.end(), [](unsigned char c) { return std::isxdigit(c) != 0; });
  if (!valid) {
    throw UsageError("'{}' is not a certificate serial number (1 to 40 hex digits)", hex);
  }
  const std::string text(hex);
  BIGNUM* raw = nullptr;
  if (BN_hex2bn(&raw, text.c_str()) == 0) {
    fail("parse a serial number");
  }
  const BignumPtr bn(raw);
  return IntegerPtr(check(BN_to_ASN1_INTEGER(bn.get(), nullptr), "encode a serial number"));
}

// 16 random bytes with the top bit clear (a positive DER INTEGER) and the next bit set (so the
// encoding is always 16 bytes and the hex always 32 digits): 126 random bits.
IntegerPtr
random_serial()
{
  std::array<unsigned char, 16> bytes{};
  check(RAND_bytes(bytes.data(), static_cast<int>(bytes.size())), "draw a random serial number");
  bytes[0] = static_cast<unsigned char>((bytes[0] & 0x7f) | 0x40);
  const BignumPtr bn(check(BN_bin2bn(bytes.data(), static_cast<int>(bytes.size()), nullptr), "make a serial"));
  return IntegerPtr(check(BN_to_ASN1_INTEGER(bn.get(), nullptr), "encode a serial number"));
}

// A name with one CN entry. Throws UsageError for a name that no certificate can carry.
NamePtr
common_name_entry(std::string_view cn, std::string_view what)
{
  if (cn.empty()) {
    throw UsageError("{} is empty", what);
  }
  if (std::any_of(cn.begin(), cn.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) {
    throw UsageError("{} '{}' contains a control character", what, cn);
  }
  NamePtr name(check(X509_NAME_new(), "allocate a name"));
  if (cn.size() > INT_MAX || X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_UTF8,
                                                        reinterpret_cast<const unsigned char*>(cn.data()),
                                                        static_cast<int>(cn.size()), -1, 0) != 1) {
    ERR_clear_error();
    throw UsageError("{} '{}' cannot be a certificate's common name: it must be 1 to 64 characters of UTF-8", what, cn);
  }
  return name;
}

struct SanEntry
{
  bool is_ip = false;
  std::string text;                // the name, or the address as given (without brackets)
  std::vector<unsigned char> addr; // 4 or 16 bytes for an IP address
};

std::optional<std::vector<unsigned char>>
parse_ip(const std::string& text)
{
  std::array<unsigned char, 16> buf{};
  if (::inet_pton(AF_INET, text.c_str(), buf.data()) == 1) {
    return std::vector<unsigned char>(buf.begin(), buf.begin() + 4);
  }
  if (::inet_pton(AF_INET6, text.c_str(), buf.data()) == 1) {
    return std::vector<unsigned char>(buf.begin(), buf.end());
  }
  return std::nullopt;
}

// A host name as RFC 1123 allows, optionally with a "*." wildcard as its first label; the last
// label must not be all digits, so that a mistyped IPv4 address is not taken for a name.
bool
is_dns_name(std::string_view name)
{
  if (name.empty() || name.size() > 253) {
    return false;
  }
  std::size_t start = 0;
  bool first = true;
  std::string_view last;
  for (;;) {
    const std::size_t dot = name.find('.', start);
    const std::string_view label = name.substr(start, dot == std::string_view::npos ? dot : dot - start);
    const bool wildcard = first && label == "*" && dot != std::string_view::npos;
    if (!wildcard) {
      if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') {
        return false;
      }
      for (const unsigned char c : label) {
        if (std::isalnum(c) == 0 && c != '-') {
          return false;
        }
      }
    }
    last = label;
    first = false;
    if (dot == std::string_view::npos) {
      break;
    }
    start = dot + 1;
  }
  return !std::all_of(last.begin(), last.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
}

SanEntry
classify_server_name(const std::string& name)
{
  std::string text = name;
  const bool bracketed = text.size() > 2 && text.front() == '[' && text.back() == ']';
  if (bracketed) {
    text = text.substr(1, text.size() - 2);
  }
  if (auto addr = parse_ip(text)) {
    if (bracketed && addr->size() != 16) {
      throw UsageError("server name '{}': only IPv6 addresses are written in brackets", name);
    }
    return {true, text, std::move(*addr)};
  }
  if (!bracketed && is_dns_name(text)) {
    return {false, text, {}};
  }
  throw UsageError("server name '{}' is neither an IP address nor a DNS name", name);
}

OctetsPtr
key_identifier_of(X509* cert)
{
  // RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey bit string.
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  check(X509_pubkey_digest(cert, EVP_sha1(), md.data(), &len), "hash a public key");
  OctetsPtr id(check(ASN1_OCTET_STRING_new(), "allocate a key identifier"));
  check(ASN1_OCTET_STRING_set(id.get(), md.data(), static_cast<int>(len)), "set a key identifier");
  return id;
}

// The authority key identifier for things `issuer` signs: its subject key identifier, or the
// hash of its key if it has none.
AuthorityKeyIdPtr
authority_key_id(X509* issuer)
{
  AuthorityKeyIdPtr akid(check(AUTHORITY_KEYID_new(), "allocate an authority key identifier"));
  const ASN1_OCTET_STRING* skid = X509_get0_subject_key_id(issuer);
  akid->keyid =
    skid != nullptr ? check(ASN1_OCTET_STRING_dup(skid), "copy a key identifier") : key_identifier_of(issuer).release();
  return akid;
}

void
add_conf_extension(X509* cert, X509V3_CTX* ctx, int nid, const char* value)
{
  const ExtensionPtr ext(check(X509V3_EXT_conf_nid(nullptr, ctx, nid, value), "make a certificate extension"));
  check(X509_add_ext(cert, ext.get(), -1), "add a certificate extension");
}

void
add_subject_alt_names(X509* cert, const std::vector<SanEntry>& sans)
{
  GeneralNamesPtr names(check(sk_GENERAL_NAME_new_null(), "allocate subjectAltName"));
  for (const auto& san : sans) {
    Owned<GENERAL_NAME, GENERAL_NAME_free> gn(check(GENERAL_NAME_new(), "allocate a name"));
    if (san.is_ip) {
      OctetsPtr ip(check(ASN1_OCTET_STRING_new(), "allocate an IP address"));
      check(ASN1_OCTET_STRING_set(ip.get(), san.addr.data(), static_cast<int>(san.addr.size())), "set an IP address");
      GENERAL_NAME_set0_value(gn.get(), GEN_IPADD, ip.release());
    } else {
      Owned<ASN1_IA5STRING, ASN1_IA5STRING_free> dns(check(ASN1_IA5STRING_new(), "allocate a DNS name"));
      check(ASN1_STRING_set(dns.get(), san.text.data(), static_cast<int>(san.text.size())), "set a DNS name");
      GENERAL_NAME_set0_value(gn.get(), GEN_DNS, dns.release());
    }
    check(sk_GENERAL_NAME_push(names.get(), gn.get()), "add a name");
    (void)gn.release(); // the stack owns it now
  }
  check(X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT), "add subjectAltName");
}

enum class CertKind
{
  ca,
  server,
  client
};

// Builds and signs a certificate for a new Ed25519 key; `ca` is null for the self-signed CA.
Identity
build_certificate(const Identity* ca, CertKind kind, std::string_view cn, std::string_view cn_what,
                  const std::vector<SanEntry>& sans, const Validity& validity)
{
  check_validity(validity);
  const NamePtr subject = common_name_entry(cn, cn_what);
  Identity id{generate_ed25519_key(), Cert(check(X509_new(), "allocate a certificate"))};
  X509* x = id.cert.get();
  check(X509_set_version(x, X509_VERSION_3), "set the certificate version");
  check(X509_set_serialNumber(x, random_serial().get()), "set the serial number");
  check(X509_set_subject_name(x, subject.get()), "set the subject");
  check(X509_set_issuer_name(x, ca != nullptr ? X509_get_subject_name(ca->cert.get()) : subject.get()),
        "set the issuer");
  check(X509_set1_notBefore(x, make_time(start_of(validity)).get()), "set notBefore");
  check(X509_set1_notAfter(x, make_time(end_of(validity)).get()), "set notAfter");
  check(X509_set_pubkey(x, id.key.get()), "set the public key");

  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, ca != nullptr ? ca->cert.get() : x, x, nullptr, nullptr, 0);
  switch (kind) {
  case CertKind::ca:
    add_conf_extension(x, &ctx, NID_basic_constraints, "critical,CA:TRUE");
    add_conf_extension(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign");
    break;
  case CertKind::server:
    add_conf_extension(x, &ctx, NID_basic_constraints, "critical,CA:FALSE");
    add_conf_extension(x, &ctx, NID_key_usage, "critical,digitalSignature");
    add_conf_extension(x, &ctx, NID_ext_key_usage, "serverAuth");
    add_subject_alt_names(x, sans);
    break;
  case CertKind::client:
    add_conf_extension(x, &ctx, NID_basic_constraints, "critical,CA:FALSE");
    add_conf_extension(x, &ctx, NID_key_usage, "critical,digitalSignature");
    add_conf_extension(x, &ctx, NID_ext_key_usage, "clientAuth");
    break;
  }
  const OctetsPtr skid = key_identifier_of(x);
  check(X509_add1_ext_i2d(x, NID_subject_key_identifier, skid.get(), 0, X509V3_ADD_DEFAULT), "add the key identifier");
  AuthorityKeyIdPtr akid;
  if (ca != nullptr) {
    akid = authority_key_id(ca->cert.get());
  } else {
    akid.reset(check(AUTHORITY_KEYID_new(), "allocate an authority key identifier"));
    akid->keyid = check(ASN1_OCTET_STRING_dup(skid.get()), "copy a key identifier");
  }
  check(X509_add1_ext_i2d(x, NID_authority_key_identifier, akid.get(), 0, X509V3_ADD_DEFAULT),
        "add the authority key identifier");

  // Ed25519 signs the message itself: no digest.
  EVP_PKEY* signer = ca != nullptr ? ca->key.get() : id.key.get();
  check(X509_sign(x, signer, nullptr), "sign the certificate");
  return id;
}

std::string
bio_contents(BIO* bio)
{
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<std::size_t>(len)) : std::string();
}

// A read-only memory BIO over `text`. Throws VerifyError for text too large to be PEM.
BioPtr
memory_bio(std::string_view text, std::string_view what)
{
  if (text.size() > INT_MAX) {
    throw VerifyError("{} is too large to be PEM", what);
  }
  static const char empty = '\0';
  return BioPtr(
    check(BIO_new_mem_buf(text.empty() ? &empty : text.data(), static_cast<int>(text.size())), "open a memory buffer"));
}

std::string
file_text(const fs::path& path)
{
  const MappedFile file(path);
  const auto bytes = file.bytes();
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// The passphrase callback for keys: fedl never prompts, so an encrypted key fails to load.
int
no_passphrase(char* /*buf*/, int /*size*/, int /*rwflag*/, void* /*u*/)
{
  return -1;
}

std::string
name_entry_text(X509_NAME* name, int nid)
{
  if (name == nullptr) {
    return {};
  }
  const int i = X509_NAME_get_index_by_NID(name, nid, -1);
  if (i < 0) {
    return {};
  }
  const ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
  unsigned char* utf8 = nullptr;
  const int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0) {
    throw VerifyError("a certificate name is not valid text: {}", openssl_reason());
  }
  std::string out(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

std::vector<std::string>
subject_alt_names(X509* cert)
{
  std::vector<std::string> out;
  const GeneralNamesPtr names(
    static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  if (!names) {
    return out;
  }
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), i);
    if (gn->type == GEN_DNS) {
      const ASN1_IA5STRING* s = gn->d.dNSName;
      out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                       static_cast<std::size_t>(ASN1_STRING_length(s)));
    } else if (gn->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* ip = gn->d.iPAddress;
      const int len = ASN1_STRING_length(ip);
      std::array<char, INET6_ADDRSTRLEN> buf{};
      const int family = len == 4 ? AF_INET : len == 16 ? AF_INET6 : AF_UNSPEC;
      if (family != AF_UNSPEC && ::inet_ntop(family, ASN1_STRING_get0_data(ip), buf.data(), buf.size()) != nullptr) {
        out.emplace_back(buf.data());
      }
    }
  }
  return out;
}

std::uint64_t
crl_number(X509_CRL* crl)
{
  const IntegerPtr number(static_cast<ASN1_INTEGER*>(X509_CRL_get_ext_d2i(crl, NID_crl_number, nullptr, nullptr)));
  std::uint64_t n = 0;
  if (number && ASN1_INTEGER_get_uint64(&n, number.get()) != 1) {
    throw VerifyError("the CRL's number is not a 64-bit unsigned integer");
  }
  return n;
}

int
tolerate_stale_crl(int ok, X509_STORE_CTX* ctx)
{
  if (ok == 0 && X509_STORE_CTX_get_error(ctx) == X509_V_ERR_CRL_HAS_EXPIRED) {
    X509_STORE_CTX_set_error(ctx, X509_V_OK);
    return 1;
  }
  return ok;
}

std::string_view
purpose_role(CertPurpose purpose)
{
  switch (purpose) {
  case CertPurpose::server:
    return "a coordinator (extendedKeyUsage serverAuth)";
  case CertPurpose::client:
    return "a site (extendedKeyUsage clientAuth)";
  case CertPurpose::any:
    break;
  }
  return "this use";
}

// A certificate time for a message; never throws (the verifier has already parsed it).
std::string
time_text(const ASN1_TIME* t)
{
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) {
    return "unreadable";
  }
  return format_utc(::timegm(&tm));
}

std::string
describe(long code, X509* cert, int depth, CertPurpose purpose)
{
  std::string text;
  switch (code) {
  case X509_V_ERR_CERT_HAS_EXPIRED:
    text = "certificate has expired";
    if (cert != nullptr) {
      text += fmt::format(" (notAfter {})", time_text(X509_get0_notAfter(cert)));
    }
    break;
  case X509_V_ERR_CERT_NOT_YET_VALID:
    text = "certificate is not valid yet";
    if (cert != nullptr) {
      text += fmt::format(" (notBefore {}); check this machine's clock", time_text(X509_get0_notBefore(cert)));
    }
    break;
  case X509_V_ERR_CERT_REVOKED:
    text = "certificate has been revoked";
    if (cert != nullptr) {
      text += fmt::format(" (serial {})", serial_hex(X509_get0_serialNumber(cert)));
    }
    break;
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
  case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
  case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
  case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
  case X509_V_ERR_CERT_UNTRUSTED:
    return "not issued by this federation's CA";
  case X509_V_ERR_CERT_SIGNATURE_FAILURE:
    return "certificate signature does not verify with this federation's CA key";
  case X509_V_ERR_INVALID_PURPOSE:
    return fmt::format("certificate is not meant for {}", purpose_role(purpose));
  case X509_V_ERR_UNABLE_TO_GET_CRL:
    return "no CRL from this federation's CA to check revocation against";
  case X509_V_ERR_CRL_SIGNATURE_FAILURE:
  case X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE:
    return "the CRL's signature does not verify with this federation's CA key";
  case X509_V_ERR_CRL_NOT_YET_VALID:
    return "the CRL is not valid yet; check this machine's clock";
  case X509_V_ERR_INVALID_CA:
    return "the federation CA certificate is not a CA certificate";
  default:
    text = X509_verify_cert_error_string(code);
    break;
  }
  if (depth > 0) {
    text = "the federation CA's " + text;
  }
  return text;
}

std::optional<std::vector<unsigned char>>
decode_base64(std::string_view text)
{
  if (text.empty() || text.size() % 4 != 0 || text.size() > INT_MAX / 2) {
    return std::nullopt;
  }
  std::size_t pad = 0;
  while (pad < 2 && text[text.size() - 1 - pad] == '=') {
    ++pad;
  }
  for (std::size_t i = 0; i < text.size() - pad; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (std::isalnum(c) == 0 && c != '+' && c != '/') {
      return std::nullopt;
    }
  }
  std::vector<unsigned char> out(text.size() / 4 * 3);
  const int n =
    EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  if (n < 0 || static_cast<std::size_t>(n) < pad) {
    return std::nullopt;
  }
  out.resize(static_cast<std::size_t>(n) - pad);
  // Only the one canonical encoding counts, so that a signature has exactly one spelling.
  std::string again(4 * ((out.size() + 2) / 3) + 1, '\0');
  const int m =
    EVP_EncodeBlock(reinterpret_cast<unsigned char*>(again.data()), out.data(), static_cast<int>(out.size()));
  again.resize(static_cast<std::size_t>(std::max(m, 0)));
  if (again != text) {
    return std::nullopt;
  }
  return out;
}

bool
verify_with(EVP_PKEY* key, std::span<const std::byte> message, std::string_view signature) noexcept
{
  const ErrorQueueGuard guard;
  try {
    if (key == nullptr) {
      return false;
    }
    const auto sig = decode_base64(signature);
    if (!sig) {
      return false;
    }
    const MdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key) != 1) {
      return false;
    }
    static const unsigned char empty = 0;
    const auto* msg = message.empty() ? &empty : reinterpret_cast<const unsigned char*>(message.data());
    return EVP_DigestVerify(ctx.get(), sig->data(), sig->size(), msg, message.size()) == 1;
  } catch (...) {
    return false;
  }
}

} // namespace

PKey
generate_ed25519_key()
{
  const ErrorQueueGuard guard;
  return PKey(check(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"), "generate an Ed25519 key"));
}

Identity
create_ca(std::string_view common_name, const Validity& validity)
{
  const ErrorQueueGuard guard;
  return build_certificate(nullptr, CertKind::ca, common_name, "the CA name", {}, validity);
}

Identity
issue_server_certificate(const Identity& ca, std::span<const std::string> names, const Validity& validity)
{
  const ErrorQueueGuard guard;
  if (names.empty()) {
    throw UsageError("a server certificate needs at least one server name (a DNS name or an IP address)");
  }
  std::vector<SanEntry> sans;
  for (const auto& name : names) {
    sans.push_back(classify_server_name(name));
  }
  return build_certificate(&ca, CertKind::server, sans.front().text, "the server name", sans, validity);
}

Identity
issue_client_certificate(const Identity& ca, std::string_view site_name, const Validity& validity)
{
  const ErrorQueueGuard guard;
  return build_certificate(&ca, CertKind::client, site_name, "the site name", {}, validity);
}

void
write_private_key(const fs::path& path, const PKey& key)
{
  const ErrorQueueGuard guard;
  const BioPtr bio(check(BIO_new(BIO_s_secmem()), "open a memory buffer"));
  check(PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr),
        "encode the private key");
  std::string pem = bio_contents(bio.get());
  try {
    atomic_write(path, pem, FileMode::secret);
  } catch (...) {
    OPENSSL_cleanse(pem.data(), pem.size());
    throw;
  }
  OPENSSL_cleanse(pem.data(), pem.size());
}

void
write_certificate(const fs::path& path, const Cert& cert)
{
  atomic_write(path, to_pem(cert));
}

void
write_crl(const fs::path& path, const Crl& crl)
{
  atomic_write(path, to_pem(crl));
}

PKey
read_private_key(const fs::path& path)
{
  const ErrorQueueGuard guard;
  std::string text = file_text(path);
  const BioPtr bio = memory_bio(text, path.string());
  PKey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, no_passphrase, nullptr));
  const bool encrypted = text.find("ENCRYPTED") != std::string::npos;
  OPENSSL_cleanse(text.data(), text.size());
  if (!key) {
    ERR_clear_error();
    if (encrypted) {
      throw VerifyError("{} is an encrypted private key; fedl reads only unencrypted keys (protected by the "
                        "file's mode 0600), so decrypt it with `openssl pkey`",
                        path.string());
    }
    throw VerifyError("{} is not a PEM private key", path.string());
  }
  return key;
}

Cert
read_certificate(const fs::path& path)
{
  return certificate_from_pem(file_text(path), path.string());
}

Crl
read_crl(const fs::path& path)
{
  const ErrorQueueGuard guard;
  const std::string text = file_text(path);
  const BioPtr bio = memory_bio(text, path.string());
  Crl crl(PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr));
  if (!crl) {
    throw VerifyError("{} is not a PEM certificate revocation list ({})", path.string(), openssl_reason());
  }
  return crl;
}

Identity
read_identity(const fs::path& cert_path, const fs::path& key_path)
{
  Identity id{read_private_key(key_path), read_certificate(cert_path)};
  if (!key_matches(id.cert, id.key)) {
    throw VerifyError("{} is not the private key of the certificate {}", key_path.string(), cert_path.string());
  }
  return id;
}

std::string
to_pem(const Cert& cert)
{
  const ErrorQueueGuard guard;
  const BioPtr bio(check(BIO_new(BIO_s_mem()), "open a memory buffer"));
  check(PEM_write_bio_X509(bio.get(), cert.get()), "encode a certificate");
  return bio_contents(bio.get());
}

std::string
to_pem(const Crl& crl)
{
  const ErrorQueueGuard guard;
  const BioPtr bio(check(BIO_new(BIO_s_mem()), "open a memory buffer"));
  check(PEM_write_bio_X509_CRL(bio.get(), crl.get()), "encode a CRL");
  return bio_contents(bio.get());
}

Cert
certificate_from_pem(std::string_view pem, std::string_view what)
{
  const ErrorQueueGuard guard;
  const BioPtr bio = memory_bio(pem, what);
  Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    throw VerifyError("{} is not a PEM certificate ({})", what, openssl_reason());
  }
  return cert;
}

CertificateInfo
certificate_info(const Cert& cert)
{
  const ErrorQueueGuard guard;
  CertificateInfo info;
  X509* x = cert.get();
  info.common_name = name_entry_text(X509_get_subject_name(x), NID_commonName);
  info.issuer_common_name = name_entry_text(X509_get_issuer_name(x), NID_commonName);
  info.serial = serial_hex(X509_get0_serialNumber(x));
  info.fingerprint = certificate_fingerprint(cert);
  info.not_before = to_time_point(X509_get0_notBefore(x), "the certificate");
  info.not_after = to_time_point(X509_get0_notAfter(x), "the certificate");
  info.subject_alt_names = subject_alt_names(x);
  info.is_ca = (X509_get_extension_flags(x) & EXFLAG_CA) != 0;
  return info;
}

std::string
certificate_fingerprint(const Cert& cert)
{
  const ErrorQueueGuard guard;
  unsigned char* der = nullptr;
  const int len = i2d_X509(cert.get(), &der);
  if (len <= 0) {
    throw VerifyError("the certificate cannot be encoded as DER: {}", openssl_reason());
  }
  std::string hex = sha256_hex(std::as_bytes(std::span(der, static_cast<std::size_t>(len))));
  OPENSSL_free(der);
  return hex;
}

bool
key_matches(const Cert& cert, const PKey& key) noexcept
{
  const ErrorQueueGuard guard;
  return cert && key && X509_check_private_key(cert.get(), key.get()) == 1;
}

Crl
create_crl(const Identity& ca, std::span<const Revocation> revoked, std::uint64_t number, const Validity& validity)
{
  const ErrorQueueGuard guard;
  check_validity(validity);
  Crl crl(check(X509_CRL_new(), "allocate a CRL"));
  X509_CRL* c = crl.get();
  check(X509_CRL_set_version(c, X509_CRL_VERSION_2), "set the CRL version");
  check(X509_CRL_set_issuer_name(c, X509_get_subject_name(ca.cert.get())), "set the CRL issuer");
  check(X509_CRL_set1_lastUpdate(c, make_time(start_of(validity)).get()), "set lastUpdate");
  check(X509_CRL_set1_nextUpdate(c, make_time(end_of(validity)).get()), "set nextUpdate");
  for (const auto& r : revoked) {
    const IntegerPtr serial = parse_serial(r.serial);
    RevokedPtr entry(check(X509_REVOKED_new(), "allocate a CRL entry"));
    check(X509_REVOKED_set_serialNumber(entry.get(), serial.get()), "set a revoked serial");
    check(X509_REVOKED_set_revocationDate(entry.get(), make_time(to_time_t(r.time)).get()), "set a revocation time");
    check(X509_CRL_add0_revoked(c, entry.get()), "add a CRL entry");
    (void)entry.release(); // the CRL owns it now
  }
  check(X509_CRL_sort(c), "sort the CRL");
  const IntegerPtr crl_no(check(ASN1_INTEGER_new(), "allocate the CRL number"));
  check(ASN1_INTEGER_set_uint64(crl_no.get(), number), "set the CRL number");
  check(X509_CRL_add1_ext_i2d(c, NID_crl_number, crl_no.get(), 0, X509V3_ADD_DEFAULT), "add the CRL number");
  const AuthorityKeyIdPtr akid = authority_key_id(ca.cert.get());
  check(X509_CRL_add1_ext_i2d(c, NID_authority_key_identifier, akid.get(), 0, X509V3_ADD_DEFAULT),
        "add the authority key identifier");
  check(X509_CRL_sign(c, ca.key.get(), nullptr), "sign the CRL");
  return crl;
}

Crl
update_crl(const Identity& ca, const Crl& previous, std::span<const Revocation> add, const Validity& validity)
{
  if (!crl_signed_by(previous, ca.cert)) {
    throw VerifyError("the existing CRL is not signed by this federation's CA");
  }
  CrlInfo info = crl_info(previous);
  std::set<std::string> listed;
  for (const auto& r : info.revoked) {
    listed.insert(r.serial);
  }
  for (const auto& r : add) {
    const std::string serial = serial_hex(parse_serial(r.serial).get());
    if (listed.insert(serial).second) {
      info.revoked.push_back({serial, r.time});
    }
  }
  return create_crl(ca, info.revoked, info.number + 1, validity);
}

CrlInfo
crl_info(const Crl& crl)
{
  const ErrorQueueGuard guard;
  CrlInfo info;
  X509_CRL* c = crl.get();
  info.number = crl_number(c);
  info.last_update = to_time_point(X509_CRL_get0_lastUpdate(c), "the CRL");
  if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(c)) {
    info.next_update = to_time_point(next, "the CRL");
  }
  const STACK_OF(X509_REVOKED)* entries = X509_CRL_get_REVOKED(c);
  for (int i = 0; i < sk_X509_REVOKED_num(entries); ++i) {
    const X509_REVOKED* r = sk_X509_REVOKED_value(entries, i);
    info.revoked.push_back({serial_hex(X509_REVOKED_get0_serialNumber(r)),
                            to_time_point(X509_REVOKED_get0_revocationDate(r), "a CRL entry")});
  }
  return info;
}

bool
crl_signed_by(const Crl& crl, const Cert& ca) noexcept
{
  const ErrorQueueGuard guard;
  if (!crl || !ca) {
    return false;
  }
  EVP_PKEY* key = X509_get0_pubkey(ca.get());
  return key != nullptr && X509_NAME_cmp(X509_CRL_get_issuer(crl.get()), X509_get_subject_name(ca.get())) == 0 &&
         X509_CRL_verify(crl.get(), key) == 1;
}

bool
is_revoked(const Crl& crl, const Cert& cert) noexcept
{
  const ErrorQueueGuard guard;
  X509_REVOKED* entry = nullptr;
  return crl && cert && X509_CRL_get0_by_cert(crl.get(), &entry, cert.get()) == 1;
}

TrustStore
make_trust_store(const Cert& ca, const Crl* crl)
{
  const ErrorQueueGuard guard;
  TrustStore store(check(X509_STORE_new(), "allocate a certificate store"));
  check(X509_STORE_add_cert(store.get(), ca.get()), "add the CA to a certificate store");
  unsigned long flags = X509_V_FLAG_X509_STRICT;
  if (crl != nullptr && *crl) {
    check(X509_STORE_add_crl(store.get(), crl->get()), "add the CRL to a certificate store");
    flags |= X509_V_FLAG_CRL_CHECK;
  }
  check(X509_STORE_set_flags(store.get(), flags), "set verification flags");
  X509_STORE_set_verify_cb(store.get(), tolerate_stale_crl);
  return store;
}

CertVerdict
verify_certificate(const Cert& cert, const Cert& ca, const Crl* crl, CertPurpose purpose, std::optional<TimePoint> at)
{
  const ErrorQueueGuard guard;
  const TrustStore store = make_trust_store(ca, crl);
  const StoreCtxPtr ctx(check(X509_STORE_CTX_new(), "allocate a verification context"));
  check(X509_STORE_CTX_init(ctx.get(), store.get(), cert.get(), nullptr), "start a verification");
  if (purpose == CertPurpose::server) {
    check(X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_SERVER), "set the purpose");
  } else if (purpose == CertPurpose::client) {
    check(X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT), "set the purpose");
  }
  if (at) {
    X509_STORE_CTX_set_time(ctx.get(), 0, to_time_t(*at));
  }
  if (X509_verify_cert(ctx.get()) == 1) {
    return {true, {}};
  }
  const long code = X509_STORE_CTX_get_error(ctx.get());
  if (code == X509_V_OK) {
    return {false, fmt::format("certificate verification failed: {}", openssl_reason())};
  }
  return {false, describe(code, X509_STORE_CTX_get_current_cert(ctx.get()), X509_STORE_CTX_get_error_depth(ctx.get()),
                          purpose)};
}

std::string
describe_verify_error(long code)
{
  return describe(code, nullptr, 0, CertPurpose::any);
}

std::string
sign(const PKey& key, std::span<const std::byte> message)
{
  const ErrorQueueGuard guard;
  const MdCtxPtr ctx(check(EVP_MD_CTX_new(), "allocate a signing context"));
  check(EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, key.get()), "start signing");
  static const unsigned char empty = 0;
  const auto* msg = message.empty() ? &empty : reinterpret_cast<const unsigned char*>(message.data());
  std::size_t len = 0;
  check(EVP_DigestSign(ctx.get(), nullptr, &len, msg, message.size()), "size a signature");
  std::vector<unsigned char> sig(len);
  check(EVP_DigestSign(ctx.get(), sig.data(), &len, msg, message.size()), "sign");
  sig.resize(len);
  std::string b64(4 * ((sig.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), sig.data(), static_cast<int>(sig.size()));
  b64.resize(static_cast<std::size_t>(n));
  return b64;
}

bool
verify_signature(const PKey& key, std::span<const std::byte> message, std::string_view signature) noexcept
{
  return verify_with(key.get(), message, signature);
}

bool
verify_signature(const Cert& cert, std::span<const std::byte> message, std::string_view signature) noexcept
{
  return cert && verify_with(X509_get0_pubkey(cert.get()), message, signature);
}

} // namespace fedl::core
