// SPDX-License-Identifier: Apache-2.0
#include "core/workspace.hpp"

#include "core/error.hpp"

#include <fmt/format.h>

namespace fedl::core {

std::string
Workspace::model_name(std::uint64_t round)
{
  return fmt::format("models/global-{:06}.safetensors", round);
}

void
Workspace::require_exists() const
{
  if (!std::filesystem::is_directory(m_root)) {
    throw UsageError("{} is not a fedl workspace (no such folder); create one with fedl init", m_root.string());
  }
  if (!std::filesystem::exists(config()) || !std::filesystem::exists(ledger())) {
    throw UsageError("{} is not a fedl workspace (fedl.json or ledger.jsonl is missing)", m_root.string());
  }
}

void
check_site_name(const std::string& name)
{
  const bool ok = !name.empty() && name.size() <= 64 && name[0] != '.' && name[0] != '-' &&
                  name.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") ==
                    std::string::npos;
  if (!ok) {
    throw UsageError("site name '{}' is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with "
                     "'.' or '-'",
                     name);
  }
}

} // namespace fedl::core
