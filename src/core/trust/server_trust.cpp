// SPDX-License-Identifier: Apache-2.0
#include "core/trust/server_trust.hpp"

#include "core/config/config.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"

namespace fs = std::filesystem;

namespace fedl::core {

ServerTrust::ServerTrust(const Workspace& ws)
  : m_ws(ws), m_identity(read_identity(ws.server_cert(), ws.server_key())), m_ca(read_certificate(ws.ca_cert()))
{
  load();
}

void
ServerTrust::load()
{
  std::error_code ec;
  m_crl_time = fs::last_write_time(m_ws.crl(), ec);
  m_config_time = fs::last_write_time(m_ws.config(), ec);
  auto crl = fs::exists(m_ws.crl()) ? read_crl(m_ws.crl()) : Crl{};
  check_revocations(m_ws);
  const auto config = load_config(m_ws.config());
  m_crl = std::move(crl);
  m_clients = std::set<std::string>(config.clients.begin(), config.clients.end());
}

bool
ServerTrust::refresh()
{
  std::error_code ec1, ec2;
  const auto crl_time = fs::last_write_time(m_ws.crl(), ec1);
  const auto config_time = fs::last_write_time(m_ws.config(), ec2);
  if ((ec1 || crl_time == m_crl_time) && (ec2 || config_time == m_config_time)) {
    return false;
  }
  try {
    load();
  } catch (const Error& e) {
    FEDL_LOG_WARN("keeping the previous certificates and client list: {}", e.what());
    return false;
  }
  FEDL_LOG_INFO("reloaded the client list and CRL ({} clients)", m_clients.size());
  return true;
}

} // namespace fedl::core
