// SPDX-License-Identifier: Apache-2.0
// SubsetWriter: a partition's subsets written in the format of the data set they come from (CSV
// with its header, IDX, gzipped or not), so that a site reads its shard as it would the whole.
#include "core/format/partition.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <system_error>

namespace fs = std::filesystem;

namespace fedl::core {

namespace {

std::string_view
trim_blank(std::string_view s)
{
  // The same characters the CSV loader ignores around cells, so that "blank line" means here
  // what it means there.
  const auto blank = [](char c) { return c == ' ' || c == '\t' || c == '"' || c == '\r'; };
  while (!s.empty() && blank(s.front())) {
    s.remove_prefix(1);
  }
  while (!s.empty() && blank(s.back())) {
    s.remove_suffix(1);
  }
  return s;
}

void
put_be32(std::vector<std::byte>& out, std::size_t at, std::uint32_t v)
{
  out[at] = static_cast<std::byte>(v >> 24);
  out[at + 1] = static_cast<std::byte>(v >> 16);
  out[at + 2] = static_cast<std::byte>(v >> 8);
  out[at + 3] = static_cast<std::byte>(v);
}

std::uint32_t
get_be32(std::span<const std::byte> b, std::size_t at)
{
  return (std::to_integer<std::uint32_t>(b[at]) << 24) | (std::to_integer<std::uint32_t>(b[at + 1]) << 16) |
         (std::to_integer<std::uint32_t>(b[at + 2]) << 8) | std::to_integer<std::uint32_t>(b[at + 3]);
}

// `in` as a gzip stream (RFC 1952) with zlib's default level. The header zlib writes holds no
// file name and a zero time stamp, so the output depends on the input bytes alone. Throws Error
// naming `what` if zlib fails.
std::vector<std::byte>
gzip(std::span<const std::byte> in, const fs::path& what)
{
  z_stream zs{};
  // 16 + MAX_WBITS: a gzip wrapper rather than a zlib one.
  if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
    throw Error("cannot start the gzip encoder for {}", what.string());
  }
  std::vector<std::byte> out(static_cast<std::size_t>(deflateBound(&zs, static_cast<uLong>(in.size()))) + 64);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  std::size_t in_left = in.size();
  std::size_t produced = 0;
  constexpr std::size_t chunk_limit = std::size_t{1} << 30; // avail_in and avail_out are 32-bit
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    if (produced == out.size()) {
      out.resize(out.size() * 2);
    }
    const auto in_chunk = std::min(in_left, chunk_limit);
    const auto out_chunk = std::min(out.size() - produced, chunk_limit);
    zs.avail_in = static_cast<uInt>(in_chunk);
    zs.next_out = reinterpret_cast<Bytef*>(out.data() + produced);
    zs.avail_out = static_cast<uInt>(out_chunk);
    rc = deflate(&zs, in_chunk == in_left ? Z_FINISH : Z_NO_FLUSH);
    in_left -= in_chunk - zs.avail_in;
    produced += out_chunk - zs.avail_out;
    if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
      deflateEnd(&zs);
      throw Error("cannot compress {}: zlib error {}", what.string(), rc);
    }
  }
  deflateEnd(&zs);
  out.resize(produced);
  return out;
}

const char*
role_name(SubsetRole role)
{
  return role == SubsetRole::train ? "train" : "test";
}

} // namespace

void
require_partitionable(const fs::path& path)
{
  if (detect_format(path) == DataFormat::npy) {
    throw UsageError("{}: --partition takes CSV or IDX data (NPY is not supported for partitioning yet)",
                     path.string());
  }
}

SubsetWriter::SubsetWriter(const Dataset& data, const DataOptions& options)
  : m_data(&data), m_header(options.header.value_or(true))
{
  require_partitionable(options.path);
  const auto format = detect_format(options.path);
  const auto changed = [&](const std::string& why) {
    return Error("{} no longer matches the data loaded from it ({}); was it changed meanwhile?", options.path.string(),
                 why);
  };
  if (format != data.format) {
    throw changed("the data set was loaded as another format");
  }
  m_raw = read_maybe_gzip(options.path);

  if (format == DataFormat::csv) {
    if (data.lines.size() != data.size()) {
      throw changed("the data set has no line number for each sample");
    }
    // The file's lines, numbered as the loader numbers them (1-based, split at '\n', a final
    // line without '\n' included), each without its '\n' but with any '\r'.
    const std::string_view text(reinterpret_cast<const char*>(m_raw.data()), m_raw.size());
    std::vector<std::string_view> lines;
    for (std::size_t pos = 0; pos < text.size();) {
      auto nl = text.find('\n', pos);
      if (nl == std::string_view::npos) {
        nl = text.size();
      }
      lines.push_back(text.substr(pos, nl - pos));
      pos = nl + 1;
    }
    m_sample_lines.reserve(data.size());
    for (const auto number : data.lines) {
      if (number == 0 || number > lines.size() || trim_blank(lines[number - 1]).empty()) {
        throw changed(fmt::format("line {} is missing or blank", number));
      }
      m_sample_lines.push_back(lines[number - 1]);
    }
    if (m_header) {
      // The header is the first non-blank line; everything between it and the first sample is blank.
      const std::size_t first_sample = data.lines.empty() ? lines.size() + 1 : data.lines.front();
      for (std::size_t n = 1; n < first_sample; ++n) {
        if (!trim_blank(lines[n - 1]).empty()) {
          m_header_line = lines[n - 1];
          break;
        }
      }
      if (m_header_line.empty()) {
        throw changed("there is no header row before the first sample");
      }
    }
    return;
  }

  // IDX: bytes 0-1 zero, byte 2 the element type (0x08, unsigned byte), byte 3 the number of
  // dimensions, each dimension a big-endian uint32, then the data.
  const std::span<const std::byte> b(m_raw);
  if (b.size() < 4 || b[0] != std::byte{0} || b[1] != std::byte{0} || b[2] != std::byte{0x08}) {
    throw changed("not an IDX file of unsigned bytes");
  }
  const auto ndims = std::to_integer<std::size_t>(b[3]);
  if (ndims == 0 || ndims > 4 || b.size() < 4 + 4 * ndims) {
    throw changed("bad IDX header");
  }
  std::uint64_t total = 1;
  std::uint64_t per_sample = 1;
  for (std::size_t i = 0; i < ndims; ++i) {
    m_idx_dims.push_back(get_be32(b, 4 + 4 * i));
    total *= m_idx_dims.back();
    if (i > 0) {
      per_sample *= m_idx_dims.back();
    }
  }
  m_idx_offset = 4 + 4 * ndims;
  if (b.size() - m_idx_offset != total || m_idx_dims[0] < data.size() || per_sample != data.sample_numel()) {
    throw changed(fmt::format("its IDX header says {} samples of {} values", m_idx_dims[0], per_sample));
  }
}

std::vector<fs::path>
SubsetWriter::write(std::span<const std::size_t> indices, const fs::path& dir, SubsetRole role) const
{
  for (const auto i : indices) {
    if (i >= m_data->size()) {
      throw std::out_of_range(fmt::format("SubsetWriter::write: sample {} of a data set of {}", i, m_data->size()));
    }
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw Error("cannot create the folder {}: {}", dir.string(), ec.message());
  }
  return m_data->format == DataFormat::csv ? write_csv(indices, dir, role) : write_idx(indices, dir, role);
}

std::vector<fs::path>
SubsetWriter::write_csv(std::span<const std::size_t> indices, const fs::path& dir, SubsetRole role) const
{
  std::size_t size = m_header ? m_header_line.size() + 1 : 0;
  for (const auto i : indices) {
    size += m_sample_lines[i].size() + 1;
  }
  std::string text;
  text.reserve(size);
  if (m_header) {
    text += m_header_line;
    text += '\n';
  }
  for (const auto i : indices) {
    text += m_sample_lines[i];
    text += '\n';
  }
  const auto path = dir / fmt::format("{}.csv", role_name(role));
  atomic_write(path, text);
  return {path};
}

std::vector<fs::path>
SubsetWriter::write_idx(std::span<const std::size_t> indices, const fs::path& dir, SubsetRole role) const
{
  if (indices.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw Error("cannot write {} samples to one IDX file (at most 2^32 - 1)", indices.size());
  }
  const auto count = static_cast<std::uint32_t>(indices.size());
  const std::size_t numel = m_data->sample_numel();

  std::vector<std::byte> images(m_idx_offset + indices.size() * numel);
  std::copy_n(m_raw.begin(), m_idx_offset, images.begin());
  put_be32(images, 4, count);
  auto out = images.begin() + static_cast<std::ptrdiff_t>(m_idx_offset);
  for (const auto i : indices) {
    const auto first = m_raw.begin() + static_cast<std::ptrdiff_t>(m_idx_offset + i * numel);
    out = std::copy_n(first, numel, out);
  }

  // A one-dimensional IDX file of unsigned bytes.
  std::vector<std::byte> labels(8 + indices.size());
  labels[2] = std::byte{0x08};
  labels[3] = std::byte{1};
  put_be32(labels, 4, count);
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const auto label = m_data->labels[indices[k]];
    if (label < 0 || label > 255) {
      throw Error("{}: label {} does not fit an IDX labels file (0-255)", m_data->where(indices[k]), label);
    }
    labels[8 + k] = static_cast<std::byte>(label);
  }

  const auto images_path = dir / fmt::format("{}-images-idx3-ubyte.gz", role_name(role));
  const auto labels_path = dir / fmt::format("{}-labels-idx1-ubyte.gz", role_name(role));
  const auto images_gz = gzip(images, images_path);
  const auto labels_gz = gzip(labels, labels_path);
  const std::array<std::span<const std::byte>, 1> images_parts{images_gz};
  const std::array<std::span<const std::byte>, 1> labels_parts{labels_gz};
  atomic_write(images_path, images_parts);
  atomic_write(labels_path, labels_parts);
  return {images_path, labels_path};
}

} // namespace fedl::core
