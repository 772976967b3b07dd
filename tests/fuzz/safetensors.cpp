// SPDX-License-Identifier: Apache-2.0
// Fuzz target "safetensors": parse_safetensors (core/format/safetensors.hpp) on the bytes of a file,
// the in-memory parser that SafetensorsFile runs on a mapped model or update. What it accepts
// must be consistent (tensors packed without gaps, sizes matching shapes) and must survive
// being written back the way fedl writes a file and parsed again unchanged, with the same
// update_signed_payload (what a site's signature covers, core/trust/update.hpp), and the same
// update digest whether computed as the bytes arrive or from the parsed file. A file's fedl.dp
// metadata is then read as the coordinator reads a site's (round.cpp check_dp).
#include "fuzz.hpp"

#include "core/format/safetensors.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/update.hpp"
#include "core/util/error.hpp"

#include <algorithm>
#include <cstring>

using namespace fedl;

namespace {

bool
same_bytes(std::span<const std::byte> a, std::span<const std::byte> b)
{
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

void
check_accepted(const core::Safetensors& st, std::span<const std::byte> bytes)
{
  // Tensors in offset order, packed, ending where the file ends.
  const std::byte* end = bytes.data() + bytes.size();
  const std::byte* pos = nullptr;
  for (const auto& t : st.tensors) {
    FEDL_FUZZ_CHECK(t.data.data() >= bytes.data() && t.data.data() + t.data.size() <= end);
    FEDL_FUZZ_CHECK(pos == nullptr || t.data.data() == pos);
    FEDL_FUZZ_CHECK(t.data.size() == t.numel() * core::dtype_size(t.dtype));
    pos = t.data.data() + t.data.size();
    FEDL_FUZZ_CHECK(st.find(t.name) == &t);
  }
  if (pos != nullptr) {
    FEDL_FUZZ_CHECK(pos == end);
  }

  // Written back as fedl writes a file, then parsed again: the same tensors and metadata.
  const auto order = core::serialize_order(st.tensors);
  std::string file = core::safetensors_header(order, st.metadata);
  for (const auto* t : order) {
    file.append(reinterpret_cast<const char*>(t->data.data()), t->data.size());
  }
  const auto again = core::parse_safetensors(core::as_bytes(file), "rewritten");
  FEDL_FUZZ_CHECK(again.metadata == st.metadata);
  FEDL_FUZZ_CHECK(again.tensors.size() == st.tensors.size());
  for (const auto& t : st.tensors) {
    const auto* u = again.find(t.name);
    FEDL_FUZZ_CHECK(u != nullptr);
    FEDL_FUZZ_CHECK(u->dtype == t.dtype && u->shape == t.shape && same_bytes(u->data, t.data));
  }
  FEDL_FUZZ_CHECK(core::safetensors_sha256(st.tensors, st.metadata) == core::sha256_hex(core::as_bytes(file)));
  // What a site's signature covers depends on the content only, not on the layout.
  FEDL_FUZZ_CHECK(core::update_signed_payload(st.tensors, st.metadata) ==
                  core::update_signed_payload(again.tensors, again.metadata));
}

// What the coordinator does with a site's fedl.dp (round.cpp, check_dp): a DP-SGD report as JSON
// text inside the metadata, read with DpSgdReport::from_json; any exception is a reason to
// reject the update.
void
check_dp_metadata(const core::Safetensors& st)
{
  const auto text = st.meta("fedl.dp");
  if (!text) {
    return;
  }
  try {
    const auto dp = core::DpSgdReport::from_json(nlohmann::json::parse(*text), "fedl.dp", core::Accountant::pld_v1);
    FEDL_FUZZ_CHECK(dp.epsilon >= 0);
  } catch (const std::exception& e) {
    fuzz::refused(e);
  }
}

// The digest a coordinator computes as an update's bytes arrive (UpdateDigester, fed in uneven
// pieces) is the one the file's own parse gives: for a v2 update its digest and head, else the
// file's SHA-256.
void
check_digest(const core::Safetensors& st, std::span<const std::byte> bytes)
{
  core::UpdateDigester d;
  for (std::size_t at = 0, i = 0; at < bytes.size(); ++i) {
    const auto n = std::min<std::size_t>(1 + (i * 7919) % 4096, bytes.size() - at);
    d.update(bytes.subspan(at, n));
    at += n;
  }
  const auto streamed = d.finish();
  const auto version = core::update_signature_version(st.metadata);
  if (version == 2) {
    FEDL_FUZZ_CHECK(streamed.version == 2);
    FEDL_FUZZ_CHECK(streamed.head == core::update_head_v2(st));
    FEDL_FUZZ_CHECK(streamed.hex == core::update_digest_v2(st));
  } else {
    FEDL_FUZZ_CHECK(streamed.version == version.value_or(0));
    FEDL_FUZZ_CHECK(streamed.hex == core::sha256_hex(bytes));
  }
}

} // namespace

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  const auto bytes = std::as_bytes(std::span(data, size));
  core::Safetensors st;
  try {
    st = core::parse_safetensors(bytes, "input");
  } catch (const core::VerifyError& e) {
    fuzz::refused(e);
    return 0;
  }
  check_accepted(st, bytes);
  check_digest(st, bytes);
  check_dp_metadata(st);
  return 0;
}
