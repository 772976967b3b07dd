// SPDX-License-Identifier: Apache-2.0
// The certificate revocation list: creating and extending it, reading and writing it as PEM,
// what it lists, whether the CA signed it, and whether a certificate is on it.
#include "core/trust/pki.hpp"

#include "core/trust/pki_detail.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cctype>
#include <set>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

using namespace pki_detail;

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

} // namespace

void
write_crl(const fs::path& path, const Crl& crl)
{
  atomic_write(path, to_pem(crl));
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

std::string
to_pem(const Crl& crl)
{
  const ErrorQueueGuard guard;
  const BioPtr bio(check(BIO_new(BIO_s_mem()), "open a memory buffer"));
  check(PEM_write_bio_X509_CRL(bio.get(), crl.get()), "encode a CRL");
  return bio_contents(bio.get());
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

} // namespace fedl::core
