// SPDX-License-Identifier: Apache-2.0
// The coordinator's side of one secure aggregation attempt (issue 13; DESIGN-NOTES "Secure
// aggregation"), without sockets or a clock of its own: secagg::Server over the stage frames of
// net/secagg_protocol.hpp, each stage with its rule "everyone expected answered, or the stage's
// deadline", and "at least t" to go on.
//
//   keys ──every participant advertised (or dropped), or the deadline──▶ shares (peers sent)
//   shares ──every advertiser shared, or the deadline──▶ input (shares relayed)
//   input ──the round machine closes the attempt (every input, or the round's deadline)──▶
//   agree (the survivors named) ──every survivor signed, or the deadline──▶
//   unmask (the signatures relayed) ──every signer revealed, or the deadline──▶ done (the sum)
//   any stage ──fewer than needed──▶ failed (the attempt is recorded as round-failed and retried)
//
// A site that sends a malformed or inconsistent message, or goes away, leaves the attempt (the
// host hears it through SecureHost::drop while the machine still waits for inputs); the
// coordinator itself never stops for what a site sends.
#pragma once

#include "core/config/config.hpp"
#include "core/net/frame.hpp"
#include "core/net/secagg_protocol.hpp"
#include "core/privacy/privacy.hpp"
#include "core/secagg/protocol.hpp"
#include "core/trust/pki.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace fedl::core {

// t and k for n sites asked (SecureAggregationConfig's rules). UsageError if n < 3 or the
// configured threshold cannot be met with k neighbours.
struct SecureShape
{
  std::size_t threshold = 0;
  std::size_t neighbours = 0;
};
SecureShape secure_shape(const SecureAggregationConfig& c, std::size_t n);

// Distributed DP: the noise each site adds (Encoding::noise) so that the sum of `fewest` sites'
// draws (the fewest a sum may hold) has a standard deviation of at least σ times the sensitivity
// of one site's words (C, plus the rounding's half a word on each of `values` values).
double distributed_noise(const PrivacyConfig& dp, secagg::Encoding e, std::size_t values, std::size_t fewest);

// After rounds (up to `round`) ran with secure aggregation under `last` (the settings a "serve"
// entry recorded; null if none is known): UsageError unless `now` has it on, with a threshold of
// the same kind no lower, and distributed DP still on if it was.
void check_secure_not_weaker(const nlohmann::json& last, const std::optional<SecureAggregationConfig>& now,
                             std::uint64_t round);

class SecureHost
{
public:
  virtual ~SecureHost() = default;
  // `body`: the frame's body, if any (the signers' certificates with the unmask request).
  virtual void secure_send(const std::string& site, FrameType type, const nlohmann::json& header,
                           std::shared_ptr<const std::string> body = nullptr) = 0;
  // `site` is out of the attempt (it must not be waited for).
  virtual void secure_drop(const std::string& site, const std::string& why) = 0;
};

class SecureRound
{
public:
  enum class Stage
  {
    keys,
    shares,
    input,
    agree,
    unmask,
    done,
    failed
  };

  // What the coordinator asks of an attempt beyond the protocol's parameters.
  struct Rules
  {
    double stage_timeout = 30; // seconds each stage after the first may wait
    // The keys stage: at most this long (the round's deadline), and once the first site has
    // advertised, at most the stage timeout or twice the time that took (the model's transfer)
    // more.
    double keys_timeout = 600;
    std::size_t quorum = 2; // the fewest inputs the sum may hold (at least t)
    // The DP-SGD each input's signed report must show (fedl.json's training.dp), if any.
    std::optional<DpSgdConfig> required_dp;
    // Client-level DP: the L2 norm each site clips its update to.
    std::optional<double> clip_norm;
  };

  // An attempt over `p.sites` (their certificates in `certs`, by name), for task `task`.
  SecureRound(secagg::Params p, secagg::Encoding e, std::uint64_t task, std::map<std::string, Cert> certs, Rules rules,
              SecureHost& host, double now);

  std::uint64_t task() const noexcept { return m_task; }
  Stage stage() const noexcept { return m_stage; }
  const std::string& failure() const noexcept { return m_failure; }
  const secagg::Params& params() const noexcept { return m_p; }
  const secagg::Encoding& encoding() const noexcept { return m_e; }
  // The setup sent with `site`'s task.
  SecAggSetup setup_for(const std::string& site) const;
  bool is_participant(const std::string& site) const { return m_index.count(site) > 0; }
  std::string fingerprint(const std::string& site) const { return certificate_fingerprint(m_certs.at(site)); }

  void keys(const std::string& site, const SecAggKeys& m, double now);
  void shares(const std::string& site, const SecAggShares& m, double now);
  // Whether an input of `site` may come now (before its body is received): a refusal if not.
  std::optional<std::string> check_input(const std::string& site) const;
  // The input (the frame's body: length little-endian words); a refusal if it is not taken (the
  // site is then out of the attempt).
  std::optional<std::string> input(const std::string& site, const SecAggInput& m, std::span<const std::byte> body);
  // The machine closed the input stage: name the survivors.
  void close_input(double now);
  void signature(const std::string& site, const SecAggSignature& m, double now);
  void reveal(const std::string& site, const SecAggReveal& m, double now);
  void gone(const std::string& site, const std::string& why, double now);
  void tick(double now);

  // Once done: the sum of the survivors' words (mod 2^32).
  const std::vector<std::uint32_t>& sum() const noexcept { return m_sum; }
  // For the ledger: threshold, neighbours, range, max_samples, masked_inputs [{site, sha256,
  // clipped}], survivors, dropped_after_masking, and the sites dropped before and why.
  nlohmann::json record() const;
  // Sites accused in a complaint this attempt (for the machine to leave out of the round's next
  // attempts).
  const std::set<std::string>& accused() const noexcept { return m_accused; }
  // The DP-SGD reports of the sites whose inputs were taken.
  const std::map<std::string, DpSgdReport>& dp_reports() const noexcept { return m_dp; }

private:
  std::uint32_t index_of(const std::string& site) const { return m_index.at(site); }
  // `site`'s index if it is in the attempt and has not left it.
  std::optional<std::uint32_t> active(const std::string& site) const
  {
    const auto it = m_index.find(site);
    return it != m_index.end() && !out(it->second) ? std::optional(it->second) : std::nullopt;
  }
  bool out(std::uint32_t index) const { return m_dropped.count(name_of(index)) > 0; }
  const std::string& name_of(std::uint32_t index) const { return m_p.sites.at(index - 1); }
  void drop(const std::string& site, const std::string& why);
  void fail(const std::string& why);
  // Moves on from the current stage if nobody it waits for is left, or at its deadline.
  void advance(double now);
  void begin_stage(Stage s, double now);
  bool waiting_for(std::uint32_t index) const;

  secagg::Params m_p;
  secagg::Encoding m_e;
  std::uint64_t m_task;
  std::map<std::string, Cert> m_certs;
  Rules m_rules;
  SecureHost& m_host;
  secagg::Server m_server;
  std::map<std::string, std::uint32_t> m_index;
  Stage m_stage = Stage::keys;
  double m_started = 0;
  double m_deadline = 0;
  std::map<std::string, std::string> m_dropped; // site → why it left the attempt
  std::set<std::string> m_accused;
  nlohmann::json m_inputs = nlohmann::json::array();
  std::map<std::string, DpSgdReport> m_dp;
  std::vector<std::uint32_t> m_sum;
  std::string m_failure;
};

} // namespace fedl::core
