// SPDX-License-Identifier: Apache-2.0
// Sorting the columns of a block of updates, for the median and the trimmed mean: comparator
// networks run on many columns at once with vector min and max, with an AVX2 version chosen at
// load time.
#include "core/math/aggregate.hpp"
#include "core/math/aggregate_detail.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedl::core {

namespace aggregate_detail {

namespace {

bool
has_avx2() noexcept
{
#if FEDL_X86_64
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Sorting columns: Batcher's merge exchange (Knuth, TAOCP vol. 3, §5.2.2, Algorithm M), a
// comparator network for any n. Applied to k_tile columns at once, each comparator is a
// vectorized min and max of two rows: no branches, no data-dependent memory access.

Network
merge_exchange_network(std::size_t n)
{
  Network net;
  if (n < 2) {
    return net;
  }
  std::size_t t = 0;
  while ((std::size_t{1} << t) < n) {
    ++t;
  }
  for (std::size_t p = std::size_t{1} << (t - 1); p > 0; p >>= 1) {
    std::size_t q = std::size_t{1} << (t - 1);
    std::size_t r = 0;
    std::size_t d = p;
    for (;;) {
      for (std::size_t i = 0; i + d < n; ++i) {
        if ((i & p) == r) {
          net.emplace_back(static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i + d));
        }
      }
      if (q == p) {
        break;
      }
      d = q - p;
      q >>= 1;
      r = p;
    }
  }
  return net;
}

// Runs the comparators of `network` on `tiles` tiles of k_tile columns of the matrix `rows`
// (row stride `stride`): each comparator (a, b) puts the smaller of rows a and b, column by
// column, in row a and the larger in row b. For finite values (the only ones aggregation sees)
// the min and max instructions and a compare-and-swap agree.
template<typename T>
void
network_tiles_generic(T* rows, std::size_t stride, std::size_t tiles, const Network& network) noexcept
{
  for (std::size_t c0 = 0; c0 < tiles * k_tile; c0 += k_tile) {
    for (const auto& [a, b] : network) {
      T* ra = rows + a * stride + c0;
      T* rb = rows + b * stride + c0;
      for (std::size_t j = 0; j < k_tile; ++j) {
        const T x = ra[j];
        const T y = rb[j];
        ra[j] = std::min(x, y);
        rb[j] = std::max(x, y);
      }
    }
  }
}

#if FEDL_X86_64

template<typename T>
void
network_tiles_sse2(T* rows, std::size_t stride, std::size_t tiles, const Network& network) noexcept
{
  for (std::size_t c0 = 0; c0 < tiles * k_tile; c0 += k_tile) {
    for (const auto& [a, b] : network) {
      T* ra = rows + a * stride + c0;
      T* rb = rows + b * stride + c0;
      if constexpr (std::is_same_v<T, float>) {
        for (std::size_t j = 0; j < k_tile; j += 4) {
          const __m128 x = _mm_loadu_ps(ra + j);
          const __m128 y = _mm_loadu_ps(rb + j);
          _mm_storeu_ps(ra + j, _mm_min_ps(x, y));
          _mm_storeu_ps(rb + j, _mm_max_ps(x, y));
        }
      } else {
        for (std::size_t j = 0; j < k_tile; j += 2) {
          const __m128d x = _mm_loadu_pd(ra + j);
          const __m128d y = _mm_loadu_pd(rb + j);
          _mm_storeu_pd(ra + j, _mm_min_pd(x, y));
          _mm_storeu_pd(rb + j, _mm_max_pd(x, y));
        }
      }
    }
  }
}

template<typename T>
__attribute__((target("avx2"))) void
network_tiles_avx2(T* rows, std::size_t stride, std::size_t tiles, const Network& network) noexcept
{
  for (std::size_t c0 = 0; c0 < tiles * k_tile; c0 += k_tile) {
    for (const auto& [a, b] : network) {
      T* ra = rows + a * stride + c0;
      T* rb = rows + b * stride + c0;
      if constexpr (std::is_same_v<T, float>) {
        for (std::size_t j = 0; j < k_tile; j += 8) {
          const __m256 x = _mm256_loadu_ps(ra + j);
          const __m256 y = _mm256_loadu_ps(rb + j);
          _mm256_storeu_ps(ra + j, _mm256_min_ps(x, y));
          _mm256_storeu_ps(rb + j, _mm256_max_ps(x, y));
        }
      } else {
        for (std::size_t j = 0; j < k_tile; j += 4) {
          const __m256d x = _mm256_loadu_pd(ra + j);
          const __m256d y = _mm256_loadu_pd(rb + j);
          _mm256_storeu_pd(ra + j, _mm256_min_pd(x, y));
          _mm256_storeu_pd(rb + j, _mm256_max_pd(x, y));
        }
      }
    }
  }
}

#endif

template<typename T>
void
network_tiles(T* rows, std::size_t stride, std::size_t tiles, const Network& network) noexcept
{
#if FEDL_X86_64
  if (has_avx2()) {
    network_tiles_avx2(rows, stride, tiles, network);
  } else {
    network_tiles_sse2(rows, stride, tiles, network);
  }
#else
  network_tiles_generic(rows, stride, tiles, network);
#endif
}

} // namespace

// Sorts each column completely.
Selection
full_sort(std::size_t n)
{
  Selection s;
  if (n <= k_network_max) {
    s.network = merge_exchange_network(n);
  } else {
    s.sort_each = true;
  }
  return s;
}

// Leaves in rows [lo, hi) of each column the values that sorted rows [lo, hi) would hold, in some
// order, with the fewer comparators of two networks: Batcher's network pruned to the comparators
// those rows depend on (walking back from the output, a comparator matters if it touches a row
// that matters, and then both of its rows matter); or, when as many rows are dropped below as
// above, lo passes that move the minimum of the remaining rows to the top and lo that move the
// maximum to the bottom (2·lo·(n − lo) comparators: fewer when lo is small, as in a trimmed mean).
Selection
middle_rows(std::size_t n, std::size_t lo, std::size_t hi)
{
  Selection best;
  bool have = false;
  if (n <= k_network_max) {
    const auto full = merge_exchange_network(n);
    std::vector<bool> live(n, false);
    for (std::size_t r = lo; r < hi; ++r) {
      live[r] = true;
    }
    for (auto it = full.rbegin(); it != full.rend(); ++it) {
      if (live[it->first] || live[it->second]) {
        best.network.push_back(*it);
        live[it->first] = true;
        live[it->second] = true;
      }
    }
    std::reverse(best.network.begin(), best.network.end());
    have = true;
  }
  if (hi == n - lo && (!have || 2 * lo * (n - lo) < best.network.size())) {
    Network extract;
    for (std::size_t r = 0; r < lo; ++r) {
      for (std::size_t i = r + 1; i < n; ++i) {
        extract.emplace_back(static_cast<std::uint32_t>(r), static_cast<std::uint32_t>(i));
      }
    }
    for (std::size_t r = 0; r < lo; ++r) {
      const std::size_t bottom = n - 1 - r;
      for (std::size_t i = lo; i < bottom; ++i) {
        extract.emplace_back(static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(bottom));
      }
    }
    best.network = std::move(extract);
    best.sort_each = false;
    have = true;
  }
  if (!have) {
    best.sort_each = true;
  }
  return best;
}

// Runs `selection` on `width` columns of the n × stride matrix `rows`. `column` is scratch for n
// values, used only when sorting column by column.
template<typename T>
void
select_columns_with(T* rows, std::size_t n, std::size_t stride, std::size_t width, const Selection& selection,
                    T* column) noexcept
{
  if (n < 2) {
    return;
  }
  if (selection.sort_each) {
    for (std::size_t c = 0; c < width; ++c) {
      for (std::size_t i = 0; i < n; ++i) {
        column[i] = rows[i * stride + c];
      }
      std::sort(column, column + n);
      for (std::size_t i = 0; i < n; ++i) {
        rows[i * stride + c] = column[i];
      }
    }
    return;
  }
  const auto& network = selection.network;
  const std::size_t tiles = width / k_tile;
  network_tiles(rows, stride, tiles, network);
  const std::size_t c0 = tiles * k_tile;
  if (c0 < width) {
    for (const auto& [a, b] : network) {
      T* ra = rows + a * stride;
      T* rb = rows + b * stride;
      for (std::size_t c = c0; c < width; ++c) {
        const T x = ra[c];
        const T y = rb[c];
        ra[c] = std::min(x, y);
        rb[c] = std::max(x, y);
      }
    }
  }
}

template void select_columns_with<float>(float*, std::size_t, std::size_t, std::size_t, const Selection&,
                                         float*) noexcept;
template void select_columns_with<double>(double*, std::size_t, std::size_t, std::size_t, const Selection&,
                                          double*) noexcept;

namespace {

template<typename T>
void
select_columns_alloc(T* rows, std::size_t n, std::size_t stride, std::size_t width, const Selection& selection)
{
  std::vector<T> column(selection.sort_each ? n : 0);
  select_columns_with(rows, n, stride, width, selection, column.data());
}

} // namespace

} // namespace aggregate_detail

namespace detail {

using aggregate_detail::full_sort;
using aggregate_detail::middle_rows;
using aggregate_detail::select_columns_alloc;

void
sort_columns(float* rows, std::size_t n, std::size_t stride, std::size_t width)
{
  select_columns_alloc(rows, n, stride, width, full_sort(n));
}

void
sort_columns(double* rows, std::size_t n, std::size_t stride, std::size_t width)
{
  select_columns_alloc(rows, n, stride, width, full_sort(n));
}

void
select_middle(float* rows, std::size_t n, std::size_t stride, std::size_t width, std::size_t lo, std::size_t hi)
{
  select_columns_alloc(rows, n, stride, width, middle_rows(n, lo, hi));
}

} // namespace detail

} // namespace fedl::core
