// SPDX-License-Identifier: Apache-2.0
// The safetensors format, read and written without LibTorch.
//
// Layout (https://github.com/huggingface/safetensors, README "Format"): an unsigned 64-bit
// little-endian header size N; N bytes of UTF-8 JSON, an object mapping each tensor name to
// {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} plus an optional
// "__metadata__" object of string to string; then the byte buffer that the offsets index
// (relative to its start). Tensors are stored little-endian, row-major, packed without gaps.
// The reference implementation pads the header with spaces to a multiple of 8 bytes, sorts
// tensors by decreasing dtype size and then by name, and rejects buffers with holes, overlaps
// or trailing bytes; fedl does the same so that Python's `safetensors` reads fedl's files.
#pragma once

#include "core/util/file_io.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

enum class DType
{
  f64,
  f32,
  f16,
  bf16,
  i64,
  i32,
  i16,
  i8,
  u64,
  u32,
  u16,
  u8,
  boolean
};

// "F32", "I64", ... as the format spells them; nullopt for an unknown name.
std::optional<DType> dtype_from_name(std::string_view name) noexcept;
std::string_view dtype_name(DType dtype) noexcept;
std::size_t dtype_size(DType dtype) noexcept;

using Metadata = std::map<std::string, std::string>;

// One tensor: a view of bytes owned elsewhere (a mapped file or a caller's buffer).
struct TensorView
{
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;

  std::size_t numel() const noexcept;
};

// How deep a header may nest: the root, a tensor, its shape; one spare level.
constexpr std::size_t safetensors_max_nesting = 4;

// A parsed safetensors buffer. Tensors are in file (offset) order.
struct Safetensors
{
  std::vector<TensorView> tensors;
  Metadata metadata;

  const TensorView* find(std::string_view name) const noexcept;
  // The metadata value, or nullopt.
  std::optional<std::string> meta(const std::string& key) const;
};

// Parses `bytes` (which must outlive the result). `what` names the source in errors.
// Throws VerifyError (exit 3) for any violation of the format, saying what is wrong.
Safetensors parse_safetensors(std::span<const std::byte> bytes, std::string_view what);

// A safetensors file mapped into memory, with its parsed header and SHA-256.
class SafetensorsFile
{
public:
  // Throws Error (exit 1) if the file cannot be read, VerifyError (exit 3) if it is corrupt.
  explicit SafetensorsFile(const std::filesystem::path& path);

  const Safetensors& content() const noexcept { return m_content; }
  const std::filesystem::path& path() const noexcept { return m_file.path(); }
  std::span<const std::byte> bytes() const noexcept { return m_file.bytes(); }
  std::string sha256() const { return sha256_hex(m_file.bytes()); }
  void release() const noexcept { m_file.release(); }

private:
  MappedFile m_file;
  Safetensors m_content;
};

// The serialized header (size prefix and JSON, padded) for `tensors` in the order they will be
// written. `serialize_order` returns that order: decreasing dtype size, then name.
std::vector<const TensorView*> serialize_order(std::span<const TensorView> tensors);

// Each tensor's dtype and shape by name: what a file holds, without its bytes (which a caller
// may no longer have when it compares two files).
using TensorListing = std::map<std::string, std::pair<DType, std::vector<std::int64_t>>>;
TensorListing tensor_listing(const Safetensors& st);
// The first tensor of `want` missing from `got` or different there, or of `got` not in `want`,
// in words; "" if the two are the same.
std::string listing_difference(const TensorListing& want, const TensorListing& got);
std::string safetensors_header(std::span<const TensorView* const> ordered, const Metadata& metadata);

// The whole file as it would be written, and its SHA-256, without writing it.
std::string safetensors_sha256(std::span<const TensorView> tensors, const Metadata& metadata);

// Writes `tensors` and `metadata` to `path` atomically (temp file, fsync, rename) and returns the
// file's SHA-256, computed as it is written. Throws UsageError for duplicate names or data sizes
// that do not match shapes; Error for I/O.
std::string write_safetensors(const std::filesystem::path& path, std::span<const TensorView> tensors,
                              const Metadata& metadata);

} // namespace fedl::core
