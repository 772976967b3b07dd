// SPDX-License-Identifier: Apache-2.0
#include "core/format/partition.hpp"

#include "core/util/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>

namespace fedl::core {

namespace {

constexpr const char* k_split_forms = "iid, dirichlet:ALPHA (a number ALPHA > 0, e.g. dirichlet:0.5) or "
                                      "shards:K (an integer K >= 1 shards per site, e.g. shards:2)";

// How often partition_indices() draws all Dirichlet proportions again to give every site a
// sample before it falls back to moving samples.
constexpr int k_max_dirichlet_draws = 100;

using Rng = std::mt19937_64;

// A uniform integer in [0, n) for n >= 1, by rejection rather than a biased modulo: values
// below 2^64 mod n are drawn again, which leaves a multiple of n equally likely values.
std::uint64_t
uniform_below(Rng& rng, std::uint64_t n)
{
  const std::uint64_t reject_below = (std::uint64_t{0} - n) % n;
  for (;;) {
    const std::uint64_t x = rng();
    if (x >= reject_below) {
      return x % n;
    }
  }
}

// The Fisher-Yates shuffle (Knuth, TAOCP vol. 2, Algorithm P), with uniform_below() so that
// the result depends on the seed alone and not on the standard library.
template<typename T>
void
shuffle(std::vector<T>& items, Rng& rng)
{
  for (std::size_t i = items.size(); i > 1; --i) {
    const auto j = static_cast<std::size_t>(uniform_below(rng, i));
    std::swap(items[i - 1], items[j]);
  }
}

// A seed for a separate random stream: the SplitMix64 output function applied to the seed
// offset by `stream` golden-ratio steps, so that nearby seeds give unrelated streams.
std::uint64_t
derive_seed(std::uint64_t seed, std::uint64_t stream)
{
  std::uint64_t z = seed + stream * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The sample indices of each class, ascending by label and by index within a class.
std::map<std::int64_t, std::vector<std::size_t>>
group_by_class(const std::vector<std::int64_t>& labels)
{
  std::map<std::int64_t, std::vector<std::size_t>> classes;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    classes[labels[i]].push_back(i);
  }
  return classes;
}

// Splits `total` items in proportion to `weights` (non-negative with a positive, finite sum)
// by the largest-remainder method: each part gets the floor of its exact share, and the items
// left go one each to the parts with the largest fractional parts, ties to the lower index.
// The counts add up to `total`.
std::vector<std::size_t>
apportion(const std::vector<double>& weights, std::size_t total)
{
  const std::size_t parts = weights.size();
  const double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
  std::vector<std::size_t> counts(parts, 0);
  std::vector<double> fraction(parts, 0.0);
  std::size_t given = 0;
  for (std::size_t i = 0; i < parts; ++i) {
    const double exact = weights[i] / sum * static_cast<double>(total);
    const double whole = std::min(std::floor(exact), static_cast<double>(total));
    counts[i] = static_cast<std::size_t>(whole);
    fraction[i] = exact - whole;
    given += counts[i];
  }
  // Rounding in the sum can make the floors overshoot by an item in extreme cases; take the
  // excess back from the largest parts.
  while (given > total) {
    const auto largest = std::max_element(counts.begin(), counts.end());
    --*largest;
    --given;
  }
  std::vector<std::size_t> order(parts);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return fraction[a] > fraction[b]; });
  for (std::size_t k = 0; given < total; k = (k + 1) % parts) {
    ++counts[order[k]];
    ++given;
  }
  return counts;
}

void
require_sites(std::size_t sites, std::size_t samples, const char* what)
{
  if (sites == 0) {
    throw UsageError("--clients must be at least 1");
  }
  if (samples < sites) {
    throw UsageError("--clients {}: there are only {} {} to partition, and every site needs at least one", sites,
                     samples, what);
  }
}

std::vector<std::vector<std::size_t>>
split_iid(std::size_t samples, std::size_t sites, Rng& rng)
{
  std::vector<std::size_t> order(samples);
  std::iota(order.begin(), order.end(), std::size_t{0});
  shuffle(order, rng);
  std::vector<std::vector<std::size_t>> result(sites);
  const std::size_t base = samples / sites;
  const std::size_t extra = samples % sites;
  auto next = order.begin();
  for (std::size_t s = 0; s < sites; ++s) {
    const auto size = static_cast<std::ptrdiff_t>(base + (s < extra ? 1 : 0));
    result[s].assign(next, next + size);
    next += size;
  }
  return result;
}

// One draw of the class proportions: counts[c][s] samples of class c for site s.
using ClassCounts = std::vector<std::vector<std::size_t>>;

ClassCounts
draw_dirichlet_counts(const std::vector<std::vector<std::size_t>>& members, std::size_t sites, double alpha, Rng& rng)
{
  std::gamma_distribution<double> gamma(alpha, 1.0);
  ClassCounts counts;
  counts.reserve(members.size());
  std::vector<double> proportions(sites);
  for (const auto& samples : members) {
    // Dir(alpha, ..., alpha) is a vector of independent Gamma(alpha, 1) draws divided by their sum.
    double sum = 0;
    for (auto& p : proportions) {
      p = gamma(rng);
      sum += p;
    }
    if (!(sum > 0) || !std::isfinite(sum)) {
      // Every draw underflowed to 0 (a tiny alpha): use the limit of Dir(alpha) as alpha goes
      // to 0, all of the class on one site.
      std::fill(proportions.begin(), proportions.end(), 0.0);
      proportions[static_cast<std::size_t>(uniform_below(rng, sites))] = 1.0;
    }
    counts.push_back(apportion(proportions, samples.size()));
  }
  return counts;
}

std::vector<std::size_t>
site_totals(const ClassCounts& counts, std::size_t sites)
{
  std::vector<std::size_t> totals(sites, 0);
  for (const auto& row : counts) {
    for (std::size_t s = 0; s < sites; ++s) {
      totals[s] += row[s];
    }
  }
  return totals;
}

std::vector<std::vector<std::size_t>>
split_dirichlet(const std::vector<std::int64_t>& labels, std::size_t sites, double alpha, Rng& rng)
{
  // Each class's samples in random order; a draw then hands out consecutive runs of them.
  std::vector<std::vector<std::size_t>> members;
  for (auto& [label, samples] : group_by_class(labels)) {
    shuffle(samples, rng);
    members.push_back(std::move(samples));
  }

  ClassCounts best;
  std::size_t best_empty = std::numeric_limits<std::size_t>::max();
  for (int attempt = 0; attempt < k_max_dirichlet_draws && best_empty > 0; ++attempt) {
    auto counts = draw_dirichlet_counts(members, sites, alpha, rng);
    const auto totals = site_totals(counts, sites);
    const auto empty = static_cast<std::size_t>(std::count(totals.begin(), totals.end(), std::size_t{0}));
    if (empty < best_empty) {
      best = std::move(counts);
      best_empty = empty;
    }
  }

  // No draw served every site: each empty site takes one sample from the largest site (the
  // lowest such index), of that site's most frequent class (the lowest such label). Since
  // there are at least as many samples as sites, the donor always has two or more.
  auto totals = site_totals(best, sites);
  for (std::size_t s = 0; s < sites; ++s) {
    if (totals[s] != 0) {
      continue;
    }
    const auto donor = static_cast<std::size_t>(std::max_element(totals.begin(), totals.end()) - totals.begin());
    std::size_t cls = 0;
    for (std::size_t c = 1; c < best.size(); ++c) {
      if (best[c][donor] > best[cls][donor]) {
        cls = c;
      }
    }
    --best[cls][donor];
    ++best[cls][s];
    --totals[donor];
    ++totals[s];
  }

  std::vector<std::vector<std::size_t>> result(sites);
  for (std::size_t c = 0; c < members.size(); ++c) {
    auto next = members[c].begin();
    for (std::size_t s = 0; s < sites; ++s) {
      const auto size = static_cast<std::ptrdiff_t>(best[c][s]);
      result[s].insert(result[s].end(), next, next + size);
      next += size;
    }
  }
  return result;
}

std::vector<std::vector<std::size_t>>
split_shards(const std::vector<std::int64_t>& labels, std::size_t sites, std::size_t per_site, Rng& rng)
{
  const std::size_t samples = labels.size();
  if (per_site == 0 || per_site > samples / sites) {
    throw UsageError("--split shards:{}: {} shards per site of at least one sample each, but there are only "
                     "{} samples for {} sites; use fewer shards per site or fewer --clients",
                     per_site, per_site, samples, sites);
  }
  // Sorted by label as in McMahan et al.; the shuffle first makes which samples of a class
  // share a shard random.
  std::vector<std::size_t> order(samples);
  std::iota(order.begin(), order.end(), std::size_t{0});
  shuffle(order, rng);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return labels[a] < labels[b]; });

  const std::size_t shards = sites * per_site;
  const std::size_t base = samples / shards;
  const std::size_t extra = samples % shards;
  auto shard_begin = [&](std::size_t j) { return j * base + std::min(j, extra); };

  std::vector<std::size_t> deal(shards);
  std::iota(deal.begin(), deal.end(), std::size_t{0});
  shuffle(deal, rng);
  std::vector<std::vector<std::size_t>> result(sites);
  for (std::size_t s = 0; s < sites; ++s) {
    for (std::size_t k = 0; k < per_site; ++k) {
      const std::size_t j = deal[s * per_site + k];
      const auto first = order.begin() + static_cast<std::ptrdiff_t>(shard_begin(j));
      const auto last = order.begin() + static_cast<std::ptrdiff_t>(shard_begin(j + 1));
      result[s].insert(result[s].end(), first, last);
    }
  }
  return result;
}

} // namespace

std::string
SplitSpec::to_string() const
{
  switch (kind) {
  case SplitKind::iid:
    return "iid";
  case SplitKind::dirichlet:
    return fmt::format("dirichlet:{}", alpha);
  case SplitKind::shards:
    return fmt::format("shards:{}", shards_per_site);
  }
  return "iid";
}

SplitSpec
parse_split(const std::string& text)
{
  const auto bad = [&]() { return UsageError("--split '{}': expected {}", text, k_split_forms); };
  SplitSpec spec;
  if (text == "iid") {
    return spec;
  }
  const auto colon = text.find(':');
  if (colon == std::string::npos) {
    throw bad();
  }
  const std::string_view name(text.data(), colon);
  const std::string_view value(text.data() + colon + 1, text.size() - colon - 1);
  const char* const end = value.data() + value.size();
  if (name == "dirichlet") {
    double alpha = 0;
    const auto [p, ec] = std::from_chars(value.data(), end, alpha);
    if (value.empty() || ec != std::errc{} || p != end || !std::isfinite(alpha) || !(alpha > 0)) {
      throw bad();
    }
    spec.kind = SplitKind::dirichlet;
    spec.alpha = alpha;
    return spec;
  }
  if (name == "shards") {
    std::size_t k = 0;
    const auto [p, ec] = std::from_chars(value.data(), end, k);
    if (value.empty() || ec != std::errc{} || p != end || k == 0) {
      throw bad();
    }
    spec.kind = SplitKind::shards;
    spec.shards_per_site = k;
    return spec;
  }
  throw bad();
}

std::vector<std::vector<std::size_t>>
partition_indices(const std::vector<std::int64_t>& labels, std::size_t sites, const SplitSpec& spec, std::uint64_t seed)
{
  require_sites(sites, labels.size(), "samples");
  Rng rng(seed);
  std::vector<std::vector<std::size_t>> result;
  switch (spec.kind) {
  case SplitKind::iid:
    result = split_iid(labels.size(), sites, rng);
    break;
  case SplitKind::dirichlet:
    if (!(spec.alpha > 0) || !std::isfinite(spec.alpha)) {
      throw UsageError("--split {}: expected {}", spec.to_string(), k_split_forms);
    }
    result = split_dirichlet(labels, sites, spec.alpha, rng);
    break;
  case SplitKind::shards:
    result = split_shards(labels, sites, spec.shards_per_site, rng);
    break;
  }
  for (auto& site : result) {
    std::sort(site.begin(), site.end());
  }
  return result;
}

HoldoutSplit
split_holdout(const std::vector<std::int64_t>& labels, double fraction, std::uint64_t seed)
{
  if (!(fraction >= 0 && fraction < 1)) {
    throw UsageError("--holdout {}: expected a fraction of the samples in [0, 1), e.g. 0.2", fraction);
  }
  const std::size_t samples = labels.size();
  HoldoutSplit split;
  if (fraction == 0) {
    split.train.resize(samples);
    std::iota(split.train.begin(), split.train.end(), std::size_t{0});
    return split;
  }
  if (samples < 2) {
    throw UsageError("--holdout {}: the data has {} sample(s), too few to hold some out and train on the rest",
                     fraction, samples);
  }
  const auto wanted = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(samples)));
  const std::size_t total = std::clamp<std::size_t>(wanted, 1, samples - 1);

  auto classes = group_by_class(labels);
  std::vector<double> sizes;
  for (const auto& [label, members] : classes) {
    sizes.push_back(static_cast<double>(members.size()));
  }
  const auto take = apportion(sizes, total);
  Rng rng(derive_seed(seed, 1));
  std::vector<bool> held(samples, false);
  std::size_t c = 0;
  for (auto& [label, members] : classes) {
    shuffle(members, rng);
    for (std::size_t k = 0; k < take[c] && k < members.size(); ++k) {
      held[members[k]] = true;
    }
    ++c;
  }
  for (std::size_t i = 0; i < samples; ++i) {
    (held[i] ? split.holdout : split.train).push_back(i);
  }
  return split;
}

Partition
make_partition(const std::vector<std::int64_t>& labels, std::size_t sites, const SplitSpec& spec,
               double holdout_fraction, std::uint64_t seed)
{
  auto split = split_holdout(labels, holdout_fraction, seed);
  std::vector<std::int64_t> train_labels;
  train_labels.reserve(split.train.size());
  for (const auto i : split.train) {
    train_labels.push_back(labels[i]);
  }
  require_sites(sites, train_labels.size(), split.holdout.empty() ? "samples" : "samples left after --holdout");
  Partition partition;
  partition.sites = partition_indices(train_labels, sites, spec, seed);
  // split.train is ascending and so is each site's list, so the mapped lists stay ascending.
  for (auto& site : partition.sites) {
    for (auto& i : site) {
      i = split.train[i];
    }
  }
  partition.holdout = std::move(split.holdout);
  return partition;
}

SubsetSummary
summarize(const std::vector<std::int64_t>& labels, std::span<const std::size_t> indices)
{
  std::map<std::int64_t, std::size_t> counts;
  for (const auto i : indices) {
    ++counts[labels.at(i)];
  }
  SubsetSummary summary;
  summary.samples = indices.size();
  summary.class_counts.assign(counts.begin(), counts.end());
  return summary;
}

std::string
format_summary(const SubsetSummary& summary)
{
  std::string text = fmt::format("{} sample{}, {} class{}", summary.samples, summary.samples == 1 ? "" : "s",
                                 summary.class_counts.size(), summary.class_counts.size() == 1 ? "" : "es");
  const char* sep = ": ";
  for (const auto& [label, count] : summary.class_counts) {
    text += fmt::format("{}{}={}", sep, label, count);
    sep = " ";
  }
  return text;
}

} // namespace fedl::core
