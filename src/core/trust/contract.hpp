// SPDX-License-Identifier: Apache-2.0
// A site's contract with its federation (DESIGN-NOTES "A site against its coordinator"): what
// the site agreed to when fedl init provisioned its bundle, kept in join.json ("contract") and
// signed with the federation CA's key together with the rest of join.json. A site holds every
// task the coordinator sends to it before anything is allocated or trained: the model (its
// architecture, input shape, classes and exact tensor list, hence its size), the training
// settings (most epochs, largest batch) and the weakest DP-SGD the site accepts. The site may
// tighten it locally (fedl join --max-epochs, --min-noise-multiplier), never loosen it.
#pragma once

#include "core/config/config.hpp"
#include "core/format/safetensors.hpp"
#include "core/trust/pki.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

// Why a site did not send an update for a task: all the coordinator is told of a failure that
// involved the site's data, so that no error text can carry a path, a label or a count out.
enum class ReasonClass
{
  bad_model,
  bad_settings,
  data_mismatch,
  budget,
  internal
};
std::string_view reason_class_name(ReasonClass c) noexcept;
// The fixed sentence sent for `c` when the detail stays at the site.
std::string_view reason_class_text(ReasonClass c) noexcept;
// The class named `name` (as reason_class_name writes it); internal for anything else.
ReasonClass reason_class_from_name(std::string_view name) noexcept;

struct TensorSpec
{
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;

  bool operator==(const TensorSpec&) const = default;
};

struct SiteContract
{
  std::string arch;        // fedl.arch of every model: a zoo spec or "torchscript"
  std::string input_shape; // fedl.input_shape, e.g. "64" or "1,28,28"
  std::int64_t classes = 0;
  std::optional<std::string> torchscript_sha256; // of the bundle's model.pt, for TorchScript models
  std::vector<TensorSpec> tensors;               // exactly the model's tensors, in name order
  std::uint32_t max_epochs = TrainingConfig::max_epochs;
  std::uint32_t max_batch_size = TrainingConfig::max_batch_size;
  // The weakest DP-SGD accepted: noise_multiplier at least, max_grad_norm and delta at most.
  // None: the site trains with or without DP-SGD.
  std::optional<DpSgdConfig> min_dp;
  // How the site's data must be laid out (fedl join checks it at start); none in bundles of
  // workspaces made without data, or by an older fedl.
  std::optional<DataContract> data;

  // The largest model file a task may carry: its tensors' bytes, the size prefix, and room for
  // a header (names, shapes and fedl metadata) far larger than fedl ever writes.
  std::uint64_t max_model_bytes() const;

  nlohmann::json to_json() const;
  // UsageError naming `what` and the field for anything malformed.
  static SiteContract from_json(const nlohmann::json& j, const std::string& what);
};

// The contract of a site of the federation `config`, whose initial model is `initial` (and whose
// TorchScript module, if it has one, hashes to `torchscript_sha256`).
SiteContract make_contract(const FederationConfig& config, const Safetensors& initial,
                           std::optional<std::string> torchscript_sha256);

// Throws UsageError saying which of the task's training settings the contract does not allow.
void check_task_training(const SiteContract& contract, const TrainingConfig& training);
// Throws VerifyError saying how the task's model (already parsed) differs from the contract.
void check_task_model(const SiteContract& contract, const Safetensors& model);

// join.json, signed: `join` plus "signature", the CA's signature of the canonical JSON of the
// rest (core/ledger canonical_json).
nlohmann::json sign_join(nlohmann::json join, const Identity& ca);
// A bundle's join.json, and the contract in it (none for a bundle made by an older fedl).
struct JoinFile
{
  nlohmann::json join;
  std::optional<SiteContract> contract;
};
// Reads BUNDLE/join.json and holds the bundle to it: a join.json with a contract must be signed by
// `ca`, and a TorchScript bundle's model.pt must hash to the contract's (VerifyError, exit 3: the
// bundle was altered or its signature removed). One with neither contract nor signature reads
// with no contract. UsageError for anything that is not a join.json.
JoinFile read_join(const std::filesystem::path& bundle, const Cert& ca);

} // namespace fedl::core
