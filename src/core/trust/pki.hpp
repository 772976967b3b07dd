// SPDX-License-Identifier: Apache-2.0
// The federation's public-key infrastructure (DESIGN §3, §6): Ed25519 keys, the federation CA,
// server and client certificates, the certificate revocation list (CRL), verification pinned to
// the federation CA, and Ed25519 signatures over bytes (updates, ledger entries).
//
// Error contract of the whole module: an argument that comes from the command line or the
// configuration and is wrong (a server name that is neither an IP address nor a DNS name, a
// validity out of range, a malformed serial number) throws UsageError (exit 2); a file that
// cannot be read or written throws Error (exit 1) naming it; a file or object that is not what
// it claims (not PEM of the expected kind, a key that does not belong to its certificate, a CRL
// that the CA did not sign) throws VerifyError (exit 3) naming it; an OpenSSL failure that
// should not happen (out of memory) throws Error. Checks whose answer may be "no"
// (verify_certificate, verify_signature, is_revoked, crl_signed_by, key_matches) return that
// answer and never throw on bad input. Every function leaves OpenSSL's per-thread error queue
// empty, so that a later TLS call does not pick up a stale error.
#pragma once

#include <openssl/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

struct PKeyDeleter
{
  void operator()(EVP_PKEY* p) const noexcept;
};
struct CertDeleter
{
  void operator()(X509* p) const noexcept;
};
struct CrlDeleter
{
  void operator()(X509_CRL* p) const noexcept;
};
struct TrustStoreDeleter
{
  void operator()(X509_STORE* p) const noexcept;
};

// Owning handles. A function that takes one by reference requires it to be non-null.
using PKey = std::unique_ptr<EVP_PKEY, PKeyDeleter>;
using Cert = std::unique_ptr<X509, CertDeleter>;
using Crl = std::unique_ptr<X509_CRL, CrlDeleter>;
using TrustStore = std::unique_ptr<X509_STORE, TrustStoreDeleter>;

using TimePoint = std::chrono::system_clock::time_point;

// A private key and the certificate for it (the CA, the coordinator, or a site).
struct Identity
{
  PKey key;
  Cert cert;
};

// How far notBefore (and a CRL's lastUpdate) lies before the moment of issue, so that a peer
// whose clock is slightly behind does not reject a certificate made a moment ago.
inline constexpr std::chrono::minutes k_clock_skew{5};

// The validity of a certificate or CRL: from `from - k_clock_skew` to `from + days`. `days` must
// be 1 to 36500 (UsageError otherwise). Tests move `from` into the past to make expired ones.
struct Validity
{
  int days = 365;
  TimePoint from = std::chrono::system_clock::now();
};

// A fresh Ed25519 key pair. Throws Error only if OpenSSL cannot make one.
PKey generate_ed25519_key();

// A new key and the self-signed federation CA certificate for it: subject CN `common_name`
// (e.g. "fedl federation CA NAME"), basicConstraints CA:TRUE (critical), keyUsage keyCertSign
// and cRLSign (critical), subject and authority key identifiers, a random positive 128-bit
// serial. Throws UsageError if the name is empty, not UTF-8, longer than 64 characters or has
// control characters.
Identity create_ca(std::string_view common_name, const Validity& validity);

// A new key and a coordinator certificate signed by `ca`: CN = names[0], subjectAltName = every
// name (an IPv4 or IPv6 address becomes an IP entry, "[::1]" is accepted for IPv6, anything
// else must be a DNS name, "*." wildcard allowed), extendedKeyUsage serverAuth, keyUsage
// digitalSignature. Throws UsageError if `names` is empty or a name is neither.
Identity issue_server_certificate(const Identity& ca, std::span<const std::string> names, const Validity& validity);

// A new key and a site certificate signed by `ca`: CN = `site_name`, extendedKeyUsage
// clientAuth, keyUsage digitalSignature. Throws UsageError for a name as create_ca does.
Identity issue_client_certificate(const Identity& ca, std::string_view site_name, const Validity& validity);

// Writes PEM atomically (temporary file in the same folder, fsync, rename). A private key
// (unencrypted PKCS#8) is created with mode 0600 from the start, whatever the umask, and never
// exists with wider permissions; certificates and CRLs get the mode atomic_write gives. The
// folder's own mode is not touched. Throws Error naming the path.
void write_private_key(const std::filesystem::path& path, const PKey& key);
void write_certificate(const std::filesystem::path& path, const Cert& cert);
void write_crl(const std::filesystem::path& path, const Crl& crl);

// Reads the first PEM object of the expected kind from a file. Throws Error (exit 1) if the
// file cannot be read, VerifyError (exit 3) naming the file if it holds no valid PEM object of
// that kind (garbage, truncated, another kind, an encrypted key: fedl never prompts).
PKey read_private_key(const std::filesystem::path& path);
Cert read_certificate(const std::filesystem::path& path);
Crl read_crl(const std::filesystem::path& path);

// Reads a certificate and its private key; throws as above, and VerifyError if the key does not
// belong to the certificate.
Identity read_identity(const std::filesystem::path& cert_path, const std::filesystem::path& key_path);

// PEM text of a certificate or CRL, and a certificate from PEM text (`what` names the source in
// the VerifyError thrown for anything that is not a PEM certificate).
std::string to_pem(const Cert& cert);
std::string to_pem(const Crl& crl);
Cert certificate_from_pem(std::string_view pem, std::string_view what);
// Another owner of the same certificate (its reference count raised): neither copied nor parsed.
Cert share_certificate(const Cert& cert);

struct CertificateInfo
{
  std::string common_name;        // subject CN ("" if none)
  std::string issuer_common_name; // issuer CN ("" if none)
  std::string serial;             // lowercase hex, two digits a byte
  std::string fingerprint;        // SHA-256 of the DER, lowercase hex
  TimePoint not_before;
  TimePoint not_after;
  std::vector<std::string> subject_alt_names; // DNS names as written, IP addresses as text
  bool is_ca = false;
};

// The facts of a certificate. Throws VerifyError if it is too malformed to report them.
CertificateInfo certificate_info(const Cert& cert);

// SHA-256 of the certificate's DER as lowercase hex, as the ledger names participants.
std::string certificate_fingerprint(const Cert& cert);

// True if `key` is the private key for `cert`'s public key.
bool key_matches(const Cert& cert, const PKey& key) noexcept;

// One revoked certificate: its serial (hex as CertificateInfo::serial) and when it was revoked.
struct Revocation
{
  std::string serial;
  TimePoint time;
};

struct CrlInfo
{
  std::uint64_t number = 0; // the cRLNumber extension; 0 if absent
  TimePoint last_update;
  TimePoint next_update;
  std::vector<Revocation> revoked;
};

// A version 2 CRL signed by `ca` listing `revoked`, with cRLNumber `number`, an authority key
// identifier, lastUpdate `validity.from - k_clock_skew` and nextUpdate `validity.from + days`.
// Throws UsageError for a malformed serial or validity.
Crl create_crl(const Identity& ca, std::span<const Revocation> revoked, std::uint64_t number, const Validity& validity);

// The CRL that follows `previous`: its entries plus those of `add` whose serial it does not list
// yet, with the next cRLNumber. Throws VerifyError if `ca` did not sign `previous`.
Crl update_crl(const Identity& ca, const Crl& previous, std::span<const Revocation> add, const Validity& validity);

// What a CRL says. Throws VerifyError if it is too malformed to report it.
CrlInfo crl_info(const Crl& crl);

// True if `crl` names `ca`'s subject as its issuer and its signature verifies with `ca`'s key.
bool crl_signed_by(const Crl& crl, const Cert& ca) noexcept;

// True if `crl` lists `cert` (by serial and issuer). It does not check the CRL's signature.
bool is_revoked(const Crl& crl, const Cert& cert) noexcept;

enum class CertPurpose
{
  any,    // any certificate of the federation (e.g. the signer of a ledger entry)
  server, // a coordinator: extendedKeyUsage serverAuth
  client, // a site: extendedKeyUsage clientAuth
};

// The outcome of verify_certificate: `ok`, or why not, in words a user can act on.
struct CertVerdict
{
  bool ok = false;
  std::string reason;
  explicit operator bool() const noexcept { return ok; }
};

// A certificate store with `ca` as its only trust anchor and, when `crl` is not null, that CRL
// checked for the leaf certificate (X509_V_FLAG_CRL_CHECK), with X.509 strict checks on. A CRL
// past its nextUpdate still counts: fedl's CRL is a local file that `fedl init --revoke`
// rewrites, so its age says nothing about revocations it might miss, and rejecting every client
// when it ages would be an outage. The TLS transport hands this store to its SSL_CTX.
// Throws Error only if OpenSSL cannot allocate it.
TrustStore make_trust_store(const Cert& ca, const Crl* crl);

// Verifies `cert` against the federation CA `ca` (the only trust anchor), with the CRL when
// `crl` is not null, for `purpose`, at time `at` (now if not given). Never throws on a bad
// certificate: the verdict's reason says, e.g. "certificate has expired (notAfter ...)",
// "certificate has been revoked (serial ...)", "not issued by this federation's CA".
CertVerdict verify_certificate(const Cert& cert, const Cert& ca, const Crl* crl, CertPurpose purpose,
                               std::optional<TimePoint> at = std::nullopt);

// The friendly text for an X509_V_ERR_* code, as verify_certificate words it (for the TLS
// transport, which gets the code from SSL_get_verify_result).
std::string describe_verify_error(long code);

// The Ed25519 signature (EVP_DigestSign, no digest) of `message` as standard base64 with
// padding. Throws Error if the key cannot sign.
std::string sign(const PKey& key, std::span<const std::byte> message);

// True if `signature` (canonical base64 as sign() writes it) is a valid signature of `message`
// by `key`, or by the public key of `cert`. False for any malformed signature; never throws.
bool verify_signature(const PKey& key, std::span<const std::byte> message, std::string_view signature) noexcept;
bool verify_signature(const Cert& cert, std::span<const std::byte> message, std::string_view signature) noexcept;

} // namespace fedl::core
