// SPDX-License-Identifier: Apache-2.0
// Aggregation strategies of `fedl aggregate` and of the coordinator: the server side of a round.
//
// An update Δᵢ = trainedᵢ − base is a safetensors file with the base model's tensor names,
// dtypes (F32 or F64) and shapes, and the metadata fedl.kind=update, fedl.base_sha256 (the
// SHA-256 of the base file's bytes) and fedl.num_samples (a positive integer). Aggregation
// combines N updates into the next global model:
//
//   mean-type (weighted by the caller's weights, normally fedl.num_samples):
//     fedavg       x ← base + η · Σ nᵢΔᵢ / Σ nᵢ        (McMahan et al. 2017, "Communication-
//                                                      Efficient Learning of Deep Networks from
//                                                      Decentralized Data")
//     fedavgm      m ← μ·m + Δ̄;  x ← base + η·m       (Hsu et al. 2019, "Measuring the Effects of
//                                                      Non-Identical Data Distribution for
//                                                      Federated Visual Classification")
//     fedadam      m ← β₁m + (1−β₁)Δ̄;  v ← β₂v + (1−β₂)Δ̄²
//     fedyogi      m as fedadam;  v ← v − (1−β₂)Δ̄²·sign(v − Δ̄²)
//     fedadagrad   m as fedadam;  v ← v + Δ̄²
//                  and then x ← base + η·m / (√v + τ)  (Reddi et al. 2021, "Adaptive Federated
//                                                      Optimization", Algorithm 2: no bias
//                                                      correction; m starts at 0, v at τ²)
//   robust (unweighted: every update counts once whatever its sample count, since a sample count
//   is a claim its sender makes and must not let one sender outweigh the others):
//     median             coordinate-wise median; for an even N the mean of the two middle values
//                        (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
//                        Optimal Statistical Rates")
//     trimmed-mean:BETA  per coordinate, drop the k = floor(BETA·N) smallest and the k largest
//                        values and average the rest (Yin et al. 2018); k is computed as
//                        floor(BETA·N + 1e-9) so that 0.29·100 drops 29 despite binary rounding,
//                        and is at most (N − 1)/2
//     krum:F             score(i) = sum of the squared L2 distances from Δᵢ to its N − F − 2
//                        nearest other updates; the update with the lowest score is taken whole
//                        (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
//                        Tolerant Gradient Descent"); needs N ≥ F + 3 (the paper's guarantee
//                        needs N > 2F + 2)
//     multi-krum:F,M     the M updates with the lowest Krum scores, averaged with their weights
//                        (Blanchard et al. 2017, "Multi-Krum"); M ≤ N − F
//   and x ← base + η·(the robust aggregate).
//
// Here Δ̄ is the weighted mean Σ nᵢΔᵢ / Σ nᵢ, η the server learning rate, and squares, roots and
// signs are coordinate-wise. With a clip norm C every update is first scaled by min(1, C/‖Δᵢ‖₂),
// the norm taken over all of its tensors (the robust rules see the scaled values rounded to the
// tensor's dtype). Ties in Krum scores go to the update listed first.
//
// Arithmetic is in double precision and the new model is rounded once to each tensor's dtype, so
// fedavg with η = 1 is base + Σ nᵢΔᵢ / Σ nᵢ rounded once to F32 (the double sums err far less
// than that rounding; exact values stay exact). Optimizer state is stored in the parameters'
// dtype between rounds. Results do not depend on the number of threads or on the CPU's vector
// width, except through clipping norms and Krum distances, which are summed per thread
// (differences in the last bits of a double).
//
// Memory and speed: work is split by coordinates across threads (one per core) and streams over
// the updates in blocks, reading each once (Krum reads the chosen ones again; clipping adds a pass
// for the norms). The mean-type strategies keep a few 64 KiB buffers per thread; median and
// trimmed mean a block of about 1 MiB per thread, whose columns a vectorized comparator network
// sorts (or only partly sorts, as far as the middle rows need); Krum the N × N distances. Beside
// the new model and the optimizer state, memory is O(threads × block), whatever N; for mapped
// files see aggregate(const SafetensorsFile&, ...).

#pragma once

#include "core/format/safetensors.hpp"
#include "core/format/tensor.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

enum class Strategy
{
  fedavg,
  fedavgm,
  fedadam,
  fedyogi,
  fedadagrad,
  median,
  trimmed_mean,
  krum,
  multi_krum
};

// A parsed strategy spec (see parse_strategy).
struct StrategySpec
{
  Strategy kind = Strategy::fedavg;
  double trim = 0.0;         // trimmed-mean: BETA, the fraction dropped at each end
  std::size_t byzantine = 0; // krum, multi-krum: F, the number of faulty updates tolerated
  std::size_t select = 1;    // multi-krum: M, the number of updates averaged (1 for krum)

  // The strategy's name without parameters: "fedadam", "trimmed-mean", "multi-krum", ...
  std::string_view name() const noexcept;
  // The canonical spec, which parse_strategy() reads back to the same value: "trimmed-mean:0.1".
  std::string to_string() const;
  // True for the strategies with server optimizer state: fedavgm, fedadam, fedyogi, fedadagrad.
  bool stateful() const noexcept;
  // True if the caller's weights matter: the mean-type strategies and multi-krum.
  bool weighted() const noexcept;
  // True for the mean-type strategies (fedavg and the stateful ones), the only ones client-level
  // DP can add its noise to.
  bool mean_type() const noexcept;

  bool operator==(const StrategySpec&) const = default;
};

// Parses `fedavg`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, `median`, `trimmed-mean:BETA`
// (0 ≤ BETA < 0.5), `krum:F` (F ≥ 0) or `multi-krum:F,M` (F ≥ 0, M ≥ 1). Throws UsageError (exit 2)
// naming the spec and listing the valid forms for anything else. Whether F and M suit the number
// of updates is checked by aggregate(), which knows it.
StrategySpec parse_strategy(const std::string& spec);

// The server optimizer's hyperparameters: fedl.json's "server_optimizer", and the same object in
// the ledger's serve and round entries (config.hpp: to_json, server_optimizer_from_json). Defaults
// follow Reddi et al. 2021 (β₁ = 0.9, β₂ = 0.99, τ = 1e-3) and Hsu et al. 2019 (μ = 0.9); η = 1
// makes fedavg plain FedAvg. The adaptive strategies usually want a smaller η (Reddi et al. tune
// it per task; 1e-2 to 1e-1 is common).
struct ServerOptimizer
{
  double lr = 1.0;       // η, --server-lr; > 0
  double momentum = 0.9; // μ of fedavgm, --server-momentum; in [0, 1)
  double beta1 = 0.9;    // β₁, --beta1; in [0, 1)
  double beta2 = 0.99;   // β₂, --beta2; in [0, 1)
  double tau = 1e-3;     // τ, --tau; > 0 (also v's initial value is τ², as Reddi et al. allow)

  bool operator==(const ServerOptimizer&) const = default;
};

// The server side of a round.
struct ServerOptions
{
  ServerOptimizer optimizer;
  std::optional<double> clip_norm; // C, --clip-norm; > 0
  unsigned threads = 0;            // worker threads; 0 means one per core

  // Client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
  // Language Models", Algorithm 1 with the fixed denominator): needs clip_norm and a mean-type
  // strategy. Every clipped update counts once (weights are ignored: a sample count would let
  // one site's update outweigh the clip), Gaussian noise of standard deviation noise_std is
  // added to each coordinate of their sum, and the sum is divided by `denominator` (the number
  // of sites asked, so that a site's presence changes the mean by at most clip / denominator)
  // instead of the number of updates. The noise comes from the OS's entropy unless `seed` is
  // non-zero (tests), and then also depends on the number of threads.
  struct ClientDp
  {
    double noise_std = 0;
    double denominator = 1;
    std::uint64_t seed = 0;
  };
  std::optional<ClientDp> client_dp;
};

// Throws UsageError naming the flag if an option is out of its range.
void validate_server_options(const ServerOptions& options);

// Server optimizer state carried from round to round: m (fedavgm's momentum buffer, the first
// moment of the adaptive strategies) and v (their second moment), one tensor per parameter,
// named, shaped and typed like it. Empty before the first round; aggregate() fills it.
struct ServerState
{
  std::string strategy;       // the name of the strategy that made it; empty before round 1
  std::uint64_t round = 0;    // server steps applied so far
  std::vector<OwnedTensor> m; // in the base model's tensor order
  std::vector<OwnedTensor> v; // empty for fedavgm

  bool empty() const noexcept { return strategy.empty(); }
};

// Writes `state` as safetensors, atomically: tensors `m.<param>` and `v.<param>`, metadata
// fedl.kind=server-state, fedl.strategy and fedl.round. Throws Error (exit 1) for I/O failures.
void save_server_state(const std::filesystem::path& path, const ServerState& state);

// Reads state written by save_server_state for `spec` and the parameters `params` (the base
// model's tensors). Throws Error (exit 1) if the file cannot be read, VerifyError (exit 3) if it
// is corrupt, is not a state file, was saved by another strategy, or does not have exactly one
// m (and v) tensor of the same shape and dtype per parameter (the message names the tensor).
ServerState load_server_state(const std::filesystem::path& path, const StrategySpec& spec,
                              std::span<const TensorView> params);

// fedl.num_samples of `update` if it is a positive decimal integer of at most 2^53 (digits
// only), else nullopt.
std::optional<std::uint64_t> update_num_samples(const Safetensors& update);

// Checks one update against the base model whose file has SHA-256 `base_sha256` (compute it
// once, not per update). Returns nothing if the update is fit to aggregate, else a sentence saying
// what is wrong: fedl.kind is not "update"; fedl.base_sha256 differs from the base's; fedl.num_samples
// is missing or not a positive integer; a tensor is missing, extra, or has another shape or dtype
// than the base's (naming it); the dtype is not F32 or F64; a value is NaN or infinite (naming
// the tensor, the count and the first index). Reads every value once. Never throws for bad
// content; the caller decides whether a bad update fails the run or is skipped.
std::optional<std::string> validate_update(const Safetensors& base, std::string_view base_sha256,
                                           const Safetensors& update);
// The same for a mapped update file; its pages are dropped from the resident set as they are
// checked, so that validating many large files one after the other keeps RSS small.
std::optional<std::string> validate_update(const Safetensors& base, std::string_view base_sha256,
                                           const SafetensorsFile& update);
// validate_update in two halves: everything but the values (reads no tensor data), and the values
// alone (NaN or infinite), dropping pages as it reads. aggregate() vouches for the values of the
// updates it read (AggregateInfo::values), so that a round reads each update once.
std::optional<std::string> validate_update_form(const Safetensors& base, std::string_view base_sha256,
                                                const Safetensors& update);
std::optional<std::string> validate_update_values(const SafetensorsFile& update);

// The L2 norm of an update over all of its tensors (F32 or F64 values), in double precision.
double update_norm(const Safetensors& update);

// What the aggregation learnt of one update's values while it read them for the strategy.
struct UpdateValues
{
  bool read_whole = false; // one pass read every value once; without, the two below mean nothing
  bool finite = false;     // none was NaN or infinite
  double sum_squares = 0;  // Σ x² in double, summed in the pass's order (‖Δ‖₂² within rounding)
};

// What aggregate() did, for logs and the ledger.
struct AggregateInfo
{
  std::vector<double> norms;         // ‖Δᵢ‖₂ before clipping; filled only with clip_norm
  std::vector<bool> clipped;         // whether Δᵢ was scaled down; filled only with clip_norm
  std::vector<double> krum_scores;   // krum and multi-krum: each update's score
  std::vector<std::size_t> selected; // krum and multi-krum: the chosen updates, best first
  // Per update: its values as the aggregation read them, so that a caller need not read them
  // again to check them (validate_update_values, update_norm) where read_whole and finite.
  std::vector<UpdateValues> values;
};

// Combines `updates` (each already accepted by validate_update) into the new global model:
// its tensors, in the base's order, with the base's names, dtypes and shapes. `weights` has one
// positive, finite weight per update (normally fedl.num_samples); the robust strategies ignore it
// (see above). `state` is read and advanced (round + 1) by the stateful strategies and left alone
// by the others; pass an empty one for the first round.
//
// Throws Error (exit 1) if there are no updates, if weights do not match them, or if there are too
// few updates for the spec (krum needs N ≥ F + 3; multi-krum also M ≤ N − F); UsageError (exit 2)
// for options out of range; VerifyError (exit 3) if an update's tensors do not match the base's
// or a non-empty `state` belongs to another strategy or other parameters. Values are not
// refused here: NaN or Inf in an unvalidated update propagates into the model, and `info->values`
// says which updates the passes read in full and whether they were finite. On an exception
// `state` is unchanged.
std::vector<OwnedTensor> aggregate(const Safetensors& base, std::span<const Safetensors> updates,
                                   std::span<const double> weights, const StrategySpec& spec,
                                   const ServerOptions& options, ServerState& state, AggregateInfo* info = nullptr);

// The same for mapped files, keeping peak RSS within about 3 × model + 50 MB for any N (with the
// new model; add the optimizer state for the stateful strategies). A read fault maps a whole
// page-cache folio (up to 2 MiB), so reading N files in place keeps up to N × threads × 2 MiB
// resident; updates are therefore read in place (and their pages dropped with MADV_DONTNEED once
// consumed; the page cache keeps them) only while that fits in 2 × model + 32 MiB, and the
// others with pread() into small buffers, from a descriptor opened on the same file (same device
// and inode as the mapping: a file renamed over the path meanwhile is not read instead).
// Validate with the SafetensorsFile overload of validate_update, which drops pages as it goes.
std::vector<OwnedTensor> aggregate(const SafetensorsFile& base, std::span<const SafetensorsFile* const> updates,
                                   std::span<const double> weights, const StrategySpec& spec,
                                   const ServerOptions& options, ServerState& state, AggregateInfo* info = nullptr);
std::vector<OwnedTensor> aggregate(const SafetensorsFile& base, std::span<const SafetensorsFile> updates,
                                   std::span<const double> weights, const StrategySpec& spec,
                                   const ServerOptions& options, ServerState& state, AggregateInfo* info = nullptr);

namespace detail {

// aggregate() on mapped files, reading updates in place only while the pages that keeps resident
// fit in `in_place_budget` bytes (0: every update with pread). For the unit tests.
std::vector<OwnedTensor> aggregate_reading(const SafetensorsFile& base, std::span<const SafetensorsFile* const> updates,
                                           std::span<const double> weights, const StrategySpec& spec,
                                           const ServerOptions& options, ServerState& state,
                                           std::size_t in_place_budget, AggregateInfo* info = nullptr);

// Sorts each of the `width` columns of a row-major n × stride matrix ascending along its n rows
// (Batcher's merge-exchange network, Knuth TAOCP vol. 3 §5.2.2 Algorithm M, run on many columns
// at once with vector min/max; a plain sort per column for very large n). For the unit tests.
void sort_columns(float* rows, std::size_t n, std::size_t stride, std::size_t width);
void sort_columns(double* rows, std::size_t n, std::size_t stride, std::size_t width);

// Leaves in rows [lo, hi) of each column the values that a sort would put there, in some order
// (what the median and the trimmed mean need). Exposed for the unit tests.
void select_middle(float* rows, std::size_t n, std::size_t stride, std::size_t width, std::size_t lo, std::size_t hi);

} // namespace detail

} // namespace fedl::core
