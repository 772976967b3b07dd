// SPDX-License-Identifier: Apache-2.0
// Private to the PKI sources (pki*.cpp): owning pointers for OpenSSL objects, the error-queue
// guard and error helpers, times and validities, serial numbers, key identifiers, and PEM text
// in memory buffers.
#pragma once

#include "core/trust/pki.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <climits>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

namespace fedl::core::pki_detail {

// unique_ptr for the OpenSSL objects that only the PKI sources handle.
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
inline std::string
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
[[noreturn]] inline void
fail(std::string_view what)
{
  throw Error("OpenSSL: cannot {}: {}", what, openssl_reason());
}

template<typename T>
inline T*
check(T* p, std::string_view what)
{
  if (p == nullptr) {
    fail(what);
  }
  return p;
}

inline void
check(int rc, std::string_view what)
{
  if (rc <= 0) {
    fail(what);
  }
}

inline std::time_t
to_time_t(TimePoint t)
{
  return std::chrono::system_clock::to_time_t(t);
}

inline TimePoint
to_time_point(const ASN1_TIME* t, std::string_view what)
{
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) {
    throw VerifyError("{} has a malformed time field", what);
  }
  return std::chrono::system_clock::from_time_t(::timegm(&tm));
}

inline TimePtr
make_time(std::time_t t)
{
  return TimePtr(check(ASN1_TIME_set(nullptr, t), "encode a time"));
}

inline void
check_validity(const Validity& v)
{
  if (v.days < 1 || v.days > 36500) {
    throw UsageError("a validity must be 1 to 36500 days, not {}", v.days);
  }
}

inline std::time_t
start_of(const Validity& v)
{
  return to_time_t(v.from - k_clock_skew);
}

inline std::time_t
end_of(const Validity& v)
{
  return to_time_t(v.from) + static_cast<std::time_t>(v.days) * 86400;
}

inline std::string
lower(std::string s)
{
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

inline std::string
serial_hex(const ASN1_INTEGER* serial)
{
  const BignumPtr bn(check(ASN1_INTEGER_to_BN(serial, nullptr), "decode a serial number"));
  char* hex = check(BN_bn2hex(bn.get()), "format a serial number");
  std::string out = lower(hex);
  OPENSSL_free(hex);
  return out;
}

inline OctetsPtr
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
inline AuthorityKeyIdPtr
authority_key_id(X509* issuer)
{
  AuthorityKeyIdPtr akid(check(AUTHORITY_KEYID_new(), "allocate an authority key identifier"));
  const ASN1_OCTET_STRING* skid = X509_get0_subject_key_id(issuer);
  akid->keyid =
    skid != nullptr ? check(ASN1_OCTET_STRING_dup(skid), "copy a key identifier") : key_identifier_of(issuer).release();
  return akid;
}

inline std::string
bio_contents(BIO* bio)
{
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<std::size_t>(len)) : std::string();
}

// A read-only memory BIO over `text`. Throws VerifyError for text too large to be PEM.
inline BioPtr
memory_bio(std::string_view text, std::string_view what)
{
  if (text.size() > INT_MAX) {
    throw VerifyError("{} is too large to be PEM", what);
  }
  static const char empty = '\0';
  return BioPtr(
    check(BIO_new_mem_buf(text.empty() ? &empty : text.data(), static_cast<int>(text.size())), "open a memory buffer"));
}

inline std::string
file_text(const std::filesystem::path& path)
{
  const MappedFile file(path);
  const auto bytes = file.bytes();
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

} // namespace fedl::core::pki_detail
