// SPDX-License-Identifier: Apache-2.0
#include "core/federation/ledger_state.hpp"

#include "core/util/error.hpp"

namespace fedl::core {

void
LedgerState::apply(const LedgerEntry& e, bool verify)
{
  model.update(e);
  ends_with_budget_stop = e.kind == "finished" && e.body.value("reason", "") == "privacy-budget";
  if (ends_with_budget_stop) {
    budget_stop = e.body;
  }
  if (e.kind == "serve") {
    if (const auto s = e.body.find("secure_aggregation"); s != e.body.end() && s->is_object()) {
      secure_settings = *s;
    }
  }
  if (e.kind != "round") {
    return;
  }
  accuracy.reset();
  best = BestModel::from_json(e.body.value("best", nlohmann::json()));
  if (const auto ev = e.body.find("evaluation");
      ev != e.body.end() && ev->is_object() && ev->contains("accuracy") && (*ev)["accuracy"].is_number()) {
    accuracy = (*ev)["accuracy"].get<double>();
  }
  try {
    privacy.replay(e.body, verify);
  } catch (const VerifyError& err) {
    throw VerifyError("line {}: {}", e.line, err.what());
  }
  if (const auto p = e.body.find("privacy"); p != e.body.end() && p->is_object() && p->contains("client")) {
    client_dp = *p;
  }
  if (const auto a = e.body.find("secure_aggregation"); a != e.body.end() && a->is_object()) {
    secure_round = model.round;
  }
}

LedgerState
LedgerState::read(const Workspace& ws)
{
  LedgerState state;
  state.advance(ws);
  return state;
}

void
LedgerState::advance(const Workspace& ws)
{
  try {
    for_each_workspace_entry(
      ws, [&](LedgerEntry&& e) { apply(e); }, &m_read);
  } catch (...) {
    // Part of the new entries may have been applied: nothing of this state can be trusted.
    *this = LedgerState{};
    throw;
  }
}

} // namespace fedl::core
