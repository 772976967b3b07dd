// SPDX-License-Identifier: Apache-2.0
// The layout of a federation workspace (DESIGN §3) and the facts derived from it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace fedl::core {

class Workspace
{
public:
  explicit Workspace(std::filesystem::path root) : m_root(std::move(root)) {}

  const std::filesystem::path& root() const { return m_root; }
  std::filesystem::path config() const { return m_root / "fedl.json"; }
  std::filesystem::path ledger() const { return m_root / "ledger.jsonl"; }
  std::filesystem::path pki() const { return m_root / "pki"; }
  std::filesystem::path ca_cert() const { return pki() / "ca.crt"; }
  std::filesystem::path ca_key() const { return pki() / "ca.key"; }
  std::filesystem::path server_cert() const { return pki() / "server.crt"; }
  std::filesystem::path server_key() const { return pki() / "server.key"; }
  std::filesystem::path crl() const { return pki() / "crl.pem"; }
  std::filesystem::path clients() const { return m_root / "clients"; }
  std::filesystem::path client(const std::string& name) const { return clients() / name; }
  std::filesystem::path models() const { return m_root / "models"; }
  std::filesystem::path state() const { return m_root / "state"; }
  std::filesystem::path data() const { return m_root / "data"; }
  // models/global-NNNNNN.safetensors, relative to the root (as the ledger records it).
  static std::string model_name(std::uint64_t round);
  std::filesystem::path model(std::uint64_t round) const { return m_root / model_name(round); }

  // Throws UsageError if `root` does not look like a workspace (no fedl.json or ledger).
  void require_exists() const;

private:
  std::filesystem::path m_root;
};

// A site name must be usable as a folder name and a certificate CN: 1-64 characters of
// [A-Za-z0-9._-], not starting with '.' or '-'. Throws UsageError naming it.
void check_site_name(const std::string& name);

} // namespace fedl::core
