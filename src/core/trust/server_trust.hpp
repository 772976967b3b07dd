// SPDX-License-Identifier: Apache-2.0
// What a live coordinator trusts: its identity, the federation CA, the CRL and fedl.json's client
// list, reloaded when `fedl init WS --add-client` or `--revoke` change them on disk.
#pragma once

#include "core/trust/pki.hpp"
#include "core/trust/workspace.hpp"

#include <filesystem>
#include <set>
#include <string>

namespace fedl::core {

class ServerTrust
{
public:
  // Reads pki/server.{crt,key}, pki/ca.crt, pki/crl.pem and fedl.json; checks that the CRL lists
  // every revocation the ledger records. Throws Error naming the file.
  explicit ServerTrust(const Workspace& ws);

  // Reloads the CRL and the client list if fedl.json or the CRL changed on disk since the last
  // look; true if they were reloaded. If they cannot be read, keeps the previous ones (with a
  // warning) and returns false.
  bool refresh();

  bool enrolled(const std::string& site) const { return m_clients.count(site) > 0; }
  bool revoked(const Cert& cert) const noexcept { return m_crl && is_revoked(m_crl, cert); }

  const Identity& identity() const noexcept { return m_identity; }
  const Cert& ca() const noexcept { return m_ca; }
  const Crl& crl() const noexcept { return m_crl; }
  const std::set<std::string>& clients() const noexcept { return m_clients; }

private:
  void load();

  const Workspace& m_ws;
  Identity m_identity;
  Cert m_ca;
  Crl m_crl;
  std::set<std::string> m_clients;
  std::filesystem::file_time_type m_crl_time;
  std::filesystem::file_time_type m_config_time;
};

} // namespace fedl::core
