// SPDX-License-Identifier: Apache-2.0
// A site's signature on an update: what it covers, and how a site makes it.
//
// Two versions (fedl-files(5), UPDATE SIGNATURES), told apart by the metadata entry
// fedl.signature_version, which both cover:
//   v1 (absent)  Ed25519 over the compact sorted JSON of the metadata (without fedl.signature)
//                and each tensor's name, dtype, shape and the SHA-256 of its data: one hash per
//                tensor, independent of the file's layout.
//   v2 ("2")     Ed25519 over {"fedl":"update-signature-v2","sha256":D}, where the update digest
//                D = SHA-256(u64le(len(H)) || H || the file's data section) and H, the update's
//                head, is the compact sorted JSON of {"fedl":"update-signature-v2","metadata":
//                (without fedl.signature),"tensors":{NAME:{"dtype","shape","data_offsets"}}}. One
//                hash over the bytes in file order, so a receiver computes it as they arrive
//                (UpdateDigester) and the ledger records D as the update's identity.
#pragma once

#include "core/format/safetensors.hpp"
#include "core/format/tensor.hpp"
#include "core/trust/pki.hpp"
#include "core/util/file_io.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace fedl::core {

// The newest update signature version this build makes and checks.
constexpr int update_signature_latest = 2;

// The version of the signature `metadata` says it has (fedl.signature_version: absent = 1).
// Nothing for a value this build does not know.
std::optional<int> update_signature_version(const Metadata& metadata) noexcept;

// v1: the bytes the signature covers (see above).
std::string update_signed_payload(std::span<const TensorView> tensors, const Metadata& metadata);

// v2: the head H of an update in file order (each tensor's data_offsets from its place in the data
// section), of a parsed file, and the message the signature covers for the digest D.
std::string update_head_v2(std::span<const TensorView* const> in_file_order, const Metadata& metadata);
std::string update_head_v2(const Safetensors& st);
std::string update_signed_message_v2(const std::string& digest);

// v2: the digest D of a parsed update, hashing its data section (one pass).
std::string update_digest_v2(const Safetensors& st);

// What identifies an update: for v2 its digest D, else the SHA-256 of its file. version 0: the
// file names a signature version this build does not know (its file hash).
struct UpdateDigest
{
  int version = 1;
  std::string hex;
  std::string head; // v2 only, from UpdateDigester: the head H that D covers
};

// An update's digest as its bytes pass by (a frame body arriving), in one pass: the size prefix
// and the header are parsed once complete, which says the version, and the data section then
// goes into the one hash that version needs. A header that does not parse, or is larger than
// 256 KiB (which it keeps meanwhile), gives the file's SHA-256 (version 1): the file's own parse
// later says what is wrong with it, or computes the v2 digest. The caller bounds the total size.
class UpdateDigester
{
public:
  void update(std::span<const std::byte> bytes);
  UpdateDigest finish();

private:
  void header_done();

  enum class Stage
  {
    size,
    header,
    data
  } m_stage = Stage::size;
  std::string m_prefix; // the size prefix, then the header text, until the data starts
  std::uint64_t m_header_size = 0;
  UpdateDigest m_result;
  Sha256 m_file;              // of every byte, unless the update turns out to be v2
  std::optional<Sha256> m_v2; // of H and the data section
};

// Signs an update as site `identity` (its certificate CN is the site): sets fedl.site,
// fedl.cert_sha256, fedl.certificate, fedl.signature_version (v2 only) and fedl.signature (any
// earlier signature is replaced). `tensors` are written in serialize_order. Used by fedl train
// --identity and by fedl join (v1 for a coordinator that checks only v1); fedl aggregate and
// fedl serve check it. Returns the site's name.
std::string sign_update(std::span<const TensorView> tensors, Metadata& metadata, const Identity& identity,
                        int version = update_signature_latest);

} // namespace fedl::core
