// SPDX-License-Identifier: Apache-2.0
// `fedl audit WS`: verify a workspace's history. The ledger's chain and every signature against
// the coordinator's certificate, that certificate against the federation CA, the CA, the
// coordinator certificate, fedl.json and the CRL against what the ledger recorded, and every
// model file against its recorded hash. Privacy: every epsilon a round records (client-level and
// each site's) is recomputed from the recorded DP parameters of it and the rounds before.
// Witnesses: sites' receipts of the ledger heads the coordinator showed them; a ledger shorter
// than, or diverging from, any of them fails (trust/receipt.hpp). Sites the ledger records as
// revoked must be in the CRL.
#pragma once

#include "core/trust/workspace.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace fedl::core {

struct Audit
{
  nlohmann::json result; // `fedl audit --json`: ok, entries, rounds, latest_model, ...
  std::string text;      // the same for a person, one line per round
};

// Throws VerifyError (exit 3) naming the first broken entry or file, UsageError if `ws` is not a
// workspace.
Audit audit_workspace(const Workspace& ws, const std::vector<std::filesystem::path>& witnesses);

} // namespace fedl::core
