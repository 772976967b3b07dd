// SPDX-License-Identifier: Apache-2.0
#include "core/format/safetensors.hpp"

#include "core/util/error.hpp"
#include "core/util/text.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <set>

namespace fedl::core {

namespace {

struct DTypeInfo
{
  DType dtype;
  std::string_view name;
  std::size_t size;
};

constexpr std::array<DTypeInfo, 13> k_dtypes{{
  {DType::f64, "F64", 8},
  {DType::f32, "F32", 4},
  {DType::f16, "F16", 2},
  {DType::bf16, "BF16", 2},
  {DType::i64, "I64", 8},
  {DType::i32, "I32", 4},
  {DType::i16, "I16", 2},
  {DType::i8, "I8", 1},
  {DType::u64, "U64", 8},
  {DType::u32, "U32", 4},
  {DType::u16, "U16", 2},
  {DType::u8, "U8", 1},
  {DType::boolean, "BOOL", 1},
}};

// The reference implementation refuses headers over 100 MB; so does fedl, before allocating.
constexpr std::uint64_t k_max_header = 100'000'000;

const DTypeInfo&
info(DType dtype) noexcept
{
  for (const auto& d : k_dtypes) {
    if (d.dtype == dtype) {
      return d;
    }
  }
  return k_dtypes[1];
}

// numel * element size, or nullopt on overflow or a negative dimension.
std::optional<std::uint64_t>
byte_size(const std::vector<std::int64_t>& shape, std::size_t elem)
{
  std::uint64_t n = elem;
  for (const auto d : shape) {
    if (d < 0) {
      return std::nullopt;
    }
    const auto ud = static_cast<std::uint64_t>(d);
    if (ud != 0 && n > std::numeric_limits<std::uint64_t>::max() / ud) {
      return std::nullopt;
    }
    n *= ud;
  }
  return n;
}

} // namespace

std::optional<DType>
dtype_from_name(std::string_view name) noexcept
{
  for (const auto& d : k_dtypes) {
    if (d.name == name) {
      return d.dtype;
    }
  }
  return std::nullopt;
}

std::string_view
dtype_name(DType dtype) noexcept
{
  return info(dtype).name;
}

std::size_t
dtype_size(DType dtype) noexcept
{
  return info(dtype).size;
}

std::size_t
TensorView::numel() const noexcept
{
  std::size_t n = 1;
  for (const auto d : shape) {
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

const TensorView*
Safetensors::find(std::string_view name) const noexcept
{
  for (const auto& t : tensors) {
    if (t.name == name) {
      return &t;
    }
  }
  return nullptr;
}

std::optional<std::string>
Safetensors::meta(const std::string& key) const
{
  const auto it = metadata.find(key);
  if (it == metadata.end()) {
    return std::nullopt;
  }
  return it->second;
}

namespace {

// The JSON header of a safetensors file and where its data begins.
std::pair<nlohmann::json, std::size_t>
read_header(std::span<const std::byte> bytes, std::string_view what)
{
  if (bytes.size() < 8) {
    throw VerifyError("{}: not a safetensors file (only {} bytes; the 8-byte header size is missing)", what,
                      bytes.size());
  }
  const std::uint64_t n = get_le(bytes.data(), 8);
  if (n > k_max_header || n > bytes.size() - 8) {
    throw VerifyError("{}: not a safetensors file or truncated (header claims {} bytes, file has {})", what, n,
                      bytes.size());
  }
  const auto* hp = reinterpret_cast<const char*>(bytes.data() + 8);
  // A safetensors header nests 3 deep (tensor, shape); refused before a parser builds a tree of
  // tens of bytes for each of a million levels.
  if (const auto depth = json_nesting({hp, static_cast<std::size_t>(n)}); depth > safetensors_max_nesting) {
    throw VerifyError("{}: corrupt safetensors header: it nests {} levels deep, more than the {} a safetensors "
                      "header has",
                      what, depth, safetensors_max_nesting);
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hp, hp + n);
  } catch (const nlohmann::json::exception& e) {
    throw VerifyError("{}: corrupt safetensors header: {}", what, e.what());
  }
  if (!header.is_object()) {
    throw VerifyError("{}: corrupt safetensors header: not a JSON object", what);
  }
  return {std::move(header), static_cast<std::size_t>(8 + n)};
}

void
read_metadata(const nlohmann::json& entry, std::string_view what, Metadata& out)
{
  if (!entry.is_object()) {
    throw VerifyError("{}: __metadata__ must be an object of strings", what);
  }
  for (const auto& [k, v] : entry.items()) {
    if (!v.is_string()) {
      throw VerifyError("{}: metadata value of {} is not a string", what, quote_text(k));
    }
    out[k] = v.get<std::string>();
  }
}

// One tensor's entry: its dtype, its shape, and data offsets within `buffer` that fit the shape.
TensorView
read_tensor(const std::string& name, const nlohmann::json& entry, std::span<const std::byte> buffer,
            std::string_view what)
{
  if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets") ||
      !entry["dtype"].is_string() || !entry["shape"].is_array() || !entry["data_offsets"].is_array() ||
      entry["data_offsets"].size() != 2) {
    throw VerifyError("{}: tensor {} has no valid dtype, shape and data_offsets", what, quote_text(name));
  }
  TensorView t;
  t.name = name;
  const auto dt = dtype_from_name(entry["dtype"].get<std::string>());
  if (!dt) {
    throw VerifyError("{}: tensor {} has unknown dtype {}", what, quote_text(name), entry["dtype"].get<std::string>());
  }
  t.dtype = *dt;
  for (const auto& d : entry["shape"]) {
    if (!d.is_number_unsigned() ||
        d.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      throw VerifyError("{}: tensor {} has an invalid shape", what, quote_text(name));
    }
    t.shape.push_back(static_cast<std::int64_t>(d.get<std::uint64_t>()));
  }
  const auto& off = entry["data_offsets"];
  if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
    throw VerifyError("{}: tensor {} has invalid data_offsets", what, quote_text(name));
  }
  const auto b = off[0].get<std::uint64_t>();
  const auto e = off[1].get<std::uint64_t>();
  const auto size = byte_size(t.shape, dtype_size(t.dtype));
  if (b > e || e > buffer.size()) {
    throw VerifyError("{}: tensor {} lies outside the file (offsets {}..{}, data has {} bytes): "
                      "the file is truncated or corrupt",
                      what, name, b, e, buffer.size());
  }
  if (!size || *size != e - b) {
    throw VerifyError("{}: tensor {} has {} bytes of data but its shape needs a different size", what, name, e - b);
  }
  t.data = buffer.subspan(b, e - b);
  return t;
}

// The tensors' data must tile `buffer` exactly: no gap, no overlap, nothing after the last.
void
check_tiling(const std::vector<TensorView>& tensors, std::span<const std::byte> buffer, std::string_view what)
{
  struct Range
  {
    std::uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& t : tensors) {
    const auto begin = static_cast<std::uint64_t>(t.data.data() - buffer.data());
    ranges.push_back({begin, begin + t.data.size(), &t.name});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  std::uint64_t pos = 0;
  for (const auto& r : ranges) {
    if (r.begin != pos) {
      throw VerifyError("{}: tensor {} does not follow the previous one (gap or overlap at byte {})", what, *r.name,
                        pos);
    }
    pos = r.end;
  }
  if (pos != buffer.size()) {
    throw VerifyError("{}: {} bytes after the last tensor: the file is corrupt", what, buffer.size() - pos);
  }
}

} // namespace

Safetensors
parse_safetensors(std::span<const std::byte> bytes, std::string_view what)
{
  const auto [header, data_start] = read_header(bytes, what);
  const auto buffer = bytes.subspan(data_start);
  Safetensors out;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      read_metadata(entry, what, out.metadata);
    } else {
      out.tensors.push_back(read_tensor(name, entry, buffer, what));
    }
  }
  check_tiling(out.tensors, buffer, what);
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorView& a, const TensorView& b) {
    return a.data.data() < b.data.data() || (a.data.data() == b.data.data() && a.name < b.name);
  });
  return out;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path)
  : m_file(path), m_content(parse_safetensors(m_file.bytes(), path.string()))
{
}

TensorListing
tensor_listing(const Safetensors& st)
{
  TensorListing out;
  for (const auto& t : st.tensors) {
    out[t.name] = {t.dtype, t.shape};
  }
  return out;
}

std::string
listing_difference(const TensorListing& want, const TensorListing& got)
{
  for (const auto& [name, info] : want) {
    const auto it = got.find(name);
    if (it == got.end()) {
      return fmt::format("tensor {} is missing", quote_text(name));
    }
    if (it->second != info) {
      return fmt::format("tensor {} has another dtype or shape", quote_text(name));
    }
  }
  for (const auto& entry : got) {
    if (want.count(entry.first) == 0) {
      return fmt::format("tensor {} is not one of the model's", quote_text(entry.first));
    }
  }
  return "";
}

std::vector<const TensorView*>
serialize_order(std::span<const TensorView> tensors)
{
  std::vector<const TensorView*> order;
  std::set<std::string_view> names;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second) {
      throw UsageError("cannot write tensor name {} twice or as a reserved name", t.name);
    }
    const auto size = byte_size(t.shape, dtype_size(t.dtype));
    if (!size || *size != t.data.size()) {
      throw UsageError("tensor {}: {} bytes of data do not match its shape", t.name, t.data.size());
    }
    order.push_back(&t);
  }
  std::stable_sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    const auto sa = dtype_size(a->dtype);
    const auto sb = dtype_size(b->dtype);
    return sa > sb || (sa == sb && a->name < b->name);
  });
  return order;
}

std::string
safetensors_header(std::span<const TensorView* const> ordered, const Metadata& metadata)
{
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    h["__metadata__"] = metadata;
  }
  std::uint64_t pos = 0;
  for (const auto* t : ordered) {
    h[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {pos, pos + t->data.size()}}};
    pos += t->data.size();
  }
  std::string json = h.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  put_le(reinterpret_cast<std::byte*>(out.data()), json.size(), 8);
  return out + json;
}

namespace {

std::vector<std::span<const std::byte>>
file_parts(const std::string& header, std::span<const TensorView* const> ordered)
{
  std::vector<std::span<const std::byte>> parts;
  parts.reserve(ordered.size() + 1);
  parts.push_back(as_bytes(header));
  for (const auto* t : ordered) {
    parts.push_back(t->data);
  }
  return parts;
}

} // namespace

std::string
safetensors_sha256(std::span<const TensorView> tensors, const Metadata& metadata)
{
  const auto order = serialize_order(tensors);
  const auto header = safetensors_header(order, metadata);
  return sha256_hex(file_parts(header, order));
}

std::string
write_safetensors(const std::filesystem::path& path, std::span<const TensorView> tensors, const Metadata& metadata)
{
  const auto order = serialize_order(tensors);
  const auto header = safetensors_header(order, metadata);
  const auto parts = file_parts(header, order);
  // Hashed as it goes out, tensor by tensor while each is in cache, rather than read back.
  Sha256 h;
  atomic_write(path, parts, FileMode::normal, &h);
  return h.hex();
}

} // namespace fedl::core
