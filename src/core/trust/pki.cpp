// SPDX-License-Identifier: Apache-2.0
// Keys and certificates: the OpenSSL deleters, Ed25519 keys, the self-signed CA and the server
// and client certificates it issues, and reading and writing keys and certificates as PEM.
// Verification and signatures are in pki_verify.cpp, the CRL in pki_crl.cpp.
#include "core/trust/pki.hpp"

#include "core/trust/pki_detail.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>

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

using namespace pki_detail;

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

// The passphrase callback for keys: fedl never prompts, so an encrypted key fails to load.
int
no_passphrase(char* /*buf*/, int /*size*/, int /*rwflag*/, void* /*u*/)
{
  return -1;
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

Cert
share_certificate(const Cert& cert)
{
  if (cert && X509_up_ref(cert.get()) != 1) {
    throw Error("cannot take another reference to a certificate");
  }
  return Cert(cert.get());
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

} // namespace fedl::core
