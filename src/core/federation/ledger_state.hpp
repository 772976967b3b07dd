// SPDX-License-Identifier: Apache-2.0
// What a workspace's ledger says the federation is, replayed entry by entry: the latest model,
// the privacy spent, the latest accuracy, the client-level DP the rounds ran with, and how the
// federation ended if it did. One replay for round planning (`aggregate --workspace`, `serve`),
// the coordinator's resume and the audit.
#pragma once

#include "core/federation/best_model.hpp"
#include "core/privacy/privacy.hpp"
#include "core/trust/ledger.hpp"
#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace fedl::core {

struct LedgerState
{
  LatestModel model;              // the genesis model or the last round's
  FederationPrivacy privacy;      // every round's privacy, composed
  std::optional<double> accuracy; // the last round's evaluation accuracy, if it recorded one
  std::optional<BestModel> best;  // the last round's "best", if it recorded one
  // The "privacy" object of the last round that had client-level DP; null if none had.
  nlohmann::json client_dp;
  // The last round that ran with secure aggregation (0: none did).
  std::uint64_t secure_round = 0;
  // The secure_aggregation settings of the last "serve" entry that had them (null if none).
  nlohmann::json secure_settings;
  // The body of the last "finished" entry for the privacy budget (null if none), and whether it
  // is the ledger's last entry.
  nlohmann::json budget_stop;
  bool ends_with_budget_stop = false;

  // Takes the next entry (in ledger order). With `verify`, every epsilon a round records is
  // recomputed first (FederationPrivacy::replay); VerifyError names the line if one disagrees or
  // a round or genesis entry lacks its model.
  void apply(const LedgerEntry& e, bool verify = false);

  // The workspace's ledger, read and verified one entry at a time (see for_each_workspace_entry):
  // a long federation's parsed ledger is never held whole.
  static LedgerState read(const Workspace& ws);

  // Applies the entries appended to `ws`'s ledger since this state was read or last advanced
  // (all of them the first time), verifying only those and checking by hash that the rest is
  // still what was read. On an exception the state starts over (the next call reads it all).
  void advance(const Workspace& ws);

private:
  LedgerPosition m_read; // how far the ledger has been applied
};

} // namespace fedl::core
