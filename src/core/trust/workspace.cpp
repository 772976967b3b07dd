// SPDX-License-Identifier: Apache-2.0
#include "core/trust/workspace.hpp"

#include "core/format/dataset.hpp"
#include "core/trust/contract.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <optional>
#include <random>
#include <set>
#include <thread>

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

WorkspaceLock::WorkspaceLock(const Workspace& ws, Kind kind, double wait_seconds)
{
  const auto path = ws.root() / (kind == Kind::serve ? ".serve.lock" : ".lock");
  m_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (m_fd < 0) {
    throw Error("cannot lock {}: {}", path.string(), std::strerror(errno));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_seconds);
  while (::flock(m_fd, LOCK_EX | LOCK_NB) != 0) {
    if (std::chrono::steady_clock::now() >= deadline) {
      ::close(m_fd);
      if (kind == Kind::serve) {
        throw Error("another fedl serve is running on {} (it holds {}); one coordinator per workspace",
                    ws.root().string(), path.string());
      }
      throw Error("{} is being changed by another fedl command (it holds {}); try again when it has finished",
                  ws.root().string(), path.string());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

WorkspaceLock::~WorkspaceLock()
{
  ::close(m_fd); // releases the lock
}

} // namespace fedl::core

namespace fedl::core {

namespace {

namespace fs = std::filesystem;

void
make_private_dir(const fs::path& dir)
{
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace);
}

// The server address a site dials: the listen address, with a wildcard host replaced by the
// first server name.
std::string
dial_address(const FederationConfig& c)
{
  const auto colon = c.listen.rfind(':');
  const auto host = c.listen.substr(0, colon);
  const auto port = colon == std::string::npos ? std::string("7443") : c.listen.substr(colon + 1);
  if ((host.empty() || host == "0.0.0.0" || host == "::" || host == "[::]") && !c.server_names.empty()) {
    const auto& name = c.server_names.front();
    return (name.find(':') != std::string::npos && name.front() != '[' ? "[" + name + "]" : name) + ":" + port;
  }
  return c.listen;
}

nlohmann::json
write_bundle(const Workspace& ws, const FederationConfig& config, const Identity& ca, const std::string& name)
{
  check_site_name(name);
  const auto dir = ws.client(name);
  make_private_dir(dir);
  const auto id = issue_client_certificate(ca, name, Validity{static_cast<int>(config.valid_days)});
  write_private_key(dir / "client.key", id.key);
  write_certificate(dir / "client.crt", id.cert);
  write_certificate(dir / "ca.crt", ca.cert);
  nlohmann::json model = {{"arch", config.model.arch},
                          {"input_shape", shape_to_string(config.model.input_shape)},
                          {"classes", config.model.classes}};
  std::optional<std::string> torchscript_sha256;
  if (config.model.torchscript) {
    fs::copy_file(ws.root() / *config.model.torchscript, dir / *config.model.torchscript,
                  fs::copy_options::overwrite_existing);
    model["torchscript"] = *config.model.torchscript;
    torchscript_sha256 = file_sha256(dir / *config.model.torchscript);
  }
  // The site's contract is cut from the federation's first model, which every later one matches.
  const SafetensorsFile initial(ws.root() / Workspace::model_name(0));
  const auto join = sign_join({{"site", name},
                               {"server", dial_address(config)},
                               {"server_name", config.server_names.empty() ? "" : config.server_names.front()},
                               {"model", model},
                               {"contract", make_contract(config, initial.content(), torchscript_sha256).to_json()}},
                              ca);
  atomic_write(dir / "join.json", join.dump(2) + "\n");
  const auto info = certificate_info(id.cert);
  return {{"name", name}, {"fingerprint", info.fingerprint}, {"serial", info.serial}};
}

} // namespace

Signer
ledger_signer(const Workspace& ws)
{
  auto key = std::make_shared<PKey>(read_private_key(ws.server_key()));
  return [key](std::string_view payload) { return sign(*key, as_bytes(payload)); };
}

Verifier
ledger_verifier(const Cert& cert)
{
  return [&cert](std::string_view payload, const std::string& sig) {
    return verify_signature(cert, as_bytes(payload), sig);
  };
}

LedgerEntry
append_signed(const Workspace& ws, const std::string& kind, const nlohmann::json& body)
{
  return append_ledger(ws.ledger(), kind, body, ledger_signer(ws));
}

nlohmann::json
provision_workspace(const Workspace& ws, const FederationConfig& config, const std::string& name)
{
  make_private_dir(ws.pki());
  fs::create_directories(ws.clients());
  fs::create_directories(ws.state());
  const Validity validity{static_cast<int>(config.valid_days)};
  const auto ca = create_ca(fmt::format("fedl federation CA {}", name).substr(0, 64), validity);
  write_private_key(ws.ca_key(), ca.key);
  write_certificate(ws.ca_cert(), ca.cert);
  const auto server = issue_server_certificate(ca, config.server_names, validity);
  write_private_key(ws.server_key(), server.key);
  write_certificate(ws.server_cert(), server.cert);
  write_crl(ws.crl(), create_crl(ca, {}, 1, validity));

  nlohmann::json clients = nlohmann::json::array();
  for (const auto& site : config.clients) {
    clients.push_back(write_bundle(ws, config, ca, site));
  }
  const auto text = config_text(config);
  atomic_write(ws.config(), text);
  const auto model = Workspace::model_name(0);
  nlohmann::json body = {
    {"config_sha256", sha256_hex(as_bytes(text))},
    {"ca_fingerprint", certificate_fingerprint(ca.cert)},
    {"server_fingerprint", certificate_fingerprint(server.cert)},
    {"crl_sha256", file_sha256(ws.crl())},
    {"model", {{"file", model}, {"sha256", file_sha256(ws.root() / model)}}},
    {"arch", config.model.arch},
    {"strategy", config.strategy},
    {"rounds", config.rounds},
    {"clients", clients},
  };
  append_signed(ws, "genesis", body);
  return body;
}

void
check_can_create_workspace(const fs::path& target, bool replace)
{
  if (!fs::exists(target) || (fs::is_directory(target) && fs::is_empty(target))) {
    return;
  }
  if (!replace) {
    throw UsageError("{} already exists; give --force to replace it, or use --add-client / --revoke to change a "
                     "workspace",
                     target.string());
  }
  if (!fs::exists(target / "fedl.json") || !fs::exists(target / "ledger.jsonl")) {
    throw UsageError("{} is not empty and not a fedl workspace; --force only replaces a workspace", target.string());
  }
}

void
create_workspace(const fs::path& target, bool replace, const std::function<void(const Workspace& staging)>& fill)
{
  check_can_create_workspace(target, replace);
  const auto parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (!fs::is_directory(parent)) {
    throw Error("cannot create {}: the folder {} does not exist", target.string(), parent.string());
  }
  std::random_device rd;
  const auto name = target.filename().string();
  const auto tmp = parent / fmt::format(".{}.init-{:08x}", name, rd());
  struct Cleanup
  {
    fs::path path;
    ~Cleanup()
    {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } cleanup{tmp};
  std::error_code ec;
  if (!fs::create_directory(tmp, ec)) {
    throw Error("cannot create a workspace in {}: {}", parent.string(), ec ? ec.message() : "exists");
  }
  fill(Workspace(tmp));
  if (fs::exists(target)) {
    const auto old = parent / fmt::format(".{}.old-{:08x}", name, rd());
    fs::rename(target, old);
    fs::rename(tmp, target);
    fs::remove_all(old, ec);
  } else {
    fs::rename(tmp, target);
  }
  cleanup.path.clear();
}

std::vector<LedgerEntry>
read_workspace_ledger(const Workspace& ws)
{
  const auto server = read_certificate(ws.server_cert());
  return read_ledger(ws.ledger(), ledger_verifier(server));
}

void
for_each_workspace_entry(const Workspace& ws, const std::function<void(LedgerEntry&&)>& visit, LedgerPosition* from)
{
  const auto cert = read_certificate(ws.server_cert());
  const auto verify = ledger_verifier(cert); // it refers to `cert`
  if (from != nullptr) {
    for_each_ledger_entry(ws.ledger(), verify, visit, *from);
  } else {
    for_each_ledger_entry(ws.ledger(), verify, visit);
  }
}

namespace {

// Throws unless `e`, if it is a revoked entry, names a serial that `listed` (read on first use
// from the workspace's CRL) holds.
void
check_revoked_entry(const Workspace& ws, const LedgerEntry& e, std::optional<std::set<std::string>>& listed)
{
  if (e.kind != "revoked") {
    return;
  }
  if (!listed) {
    listed.emplace();
    if (fs::exists(ws.crl())) {
      for (const auto& r : crl_info(read_crl(ws.crl())).revoked) {
        listed->insert(r.serial);
      }
    }
  }
  const auto serial = e.body.value("serial", std::string());
  if (listed->count(serial) == 0) {
    throw VerifyError("{} does not list site {} (serial {}), which line {} of the ledger records as revoked: an "
                      "older CRL was put back; restore the current one or revoke the site again",
                      ws.crl().string(), e.body.value("name", std::string("?")), serial, e.line);
  }
}

} // namespace

void
check_revocations(const Workspace& ws, const std::vector<LedgerEntry>& entries)
{
  std::optional<std::set<std::string>> listed;
  for (const auto& e : entries) {
    check_revoked_entry(ws, e, listed);
  }
}

void
check_revocations(const Workspace& ws)
{
  std::optional<std::set<std::string>> listed;
  for_each_workspace_entry(ws, [&](LedgerEntry&& e) { check_revoked_entry(ws, e, listed); });
}

void
LatestModel::update(const LedgerEntry& e)
{
  if (e.kind != "genesis" && e.kind != "round") {
    return;
  }
  try {
    // A float is no round number (converting one past 2^64 would be undefined).
    if (e.kind == "round" && !e.body.at("round").is_number_unsigned()) {
      throw VerifyError("ledger line {}: the round number is not an unsigned integer", e.line);
    }
    round = e.kind == "round" ? e.body.at("round").get<std::uint64_t>() : 0;
    file = e.body.at("model").at("file").get<std::string>();
    sha256 = e.body.at("model").at("sha256").get<std::string>();
  } catch (const nlohmann::json::exception&) {
    throw VerifyError("ledger line {}: the {} entry does not record its model", e.line, e.kind);
  }
}

LatestModel
latest_model(const std::vector<LedgerEntry>& entries)
{
  LatestModel latest;
  for (const auto& e : entries) {
    latest.update(e);
  }
  return latest;
}

nlohmann::json
add_client(const Workspace& ws, const std::string& name)
{
  check_site_name(name);
  const WorkspaceLock lock(ws);
  (void)read_workspace_ledger(ws); // the change must be recordable
  auto config = load_config(ws.config());
  if (std::find(config.clients.begin(), config.clients.end(), name) != config.clients.end() ||
      fs::exists(ws.client(name))) {
    throw UsageError("{}: a site named {} already exists", ws.root().string(), name);
  }
  const auto ca = read_identity(ws.ca_cert(), ws.ca_key());
  auto body = write_bundle(ws, config, ca, name);
  config.clients.push_back(name);
  const auto text = config_text(config);
  atomic_write(ws.config(), text);
  body["config_sha256"] = sha256_hex(as_bytes(text));
  append_signed(ws, "client-added", body);
  return body;
}

nlohmann::json
revoke_client(const Workspace& ws, const std::string& name)
{
  check_site_name(name);
  const WorkspaceLock lock(ws);
  (void)read_workspace_ledger(ws); // the change must be recordable
  const auto config = load_config(ws.config());
  if (std::find(config.clients.begin(), config.clients.end(), name) == config.clients.end()) {
    throw UsageError("{}: there is no site named {} (sites: {})", ws.root().string(), name,
                     fmt::join(config.clients, ", "));
  }
  const auto ca = read_identity(ws.ca_cert(), ws.ca_key());
  const auto cert = read_certificate(ws.client(name) / "client.crt");
  const auto previous = read_crl(ws.crl());
  if (is_revoked(previous, cert)) {
    throw UsageError("site {} is already revoked", name);
  }
  const auto info = certificate_info(cert);
  const std::vector<Revocation> add{{info.serial, std::chrono::system_clock::now()}};
  write_crl(ws.crl(), update_crl(ca, previous, add, Validity{static_cast<int>(config.valid_days)}));
  const nlohmann::json body = {
    {"name", name}, {"serial", info.serial}, {"fingerprint", info.fingerprint}, {"crl_sha256", file_sha256(ws.crl())}};
  append_signed(ws, "revoked", body);
  return body;
}

} // namespace fedl::core
