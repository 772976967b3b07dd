// SPDX-License-Identifier: Apache-2.0
// Checking certificates and signatures: what a certificate says (names, serial, validity,
// fingerprint), whether a key belongs to it, verification pinned to the federation CA (with the
// CRL) and its failures in words, and Ed25519 signatures over bytes in base64.
#include "core/trust/pki.hpp"

#include "core/trust/pki_detail.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <arpa/inet.h>
#include <fmt/chrono.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>
#include <ctime>

namespace fedl::core {

namespace {

using namespace pki_detail;

std::string
format_utc(std::time_t t)
{
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", fmt::gmtime(t));
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
