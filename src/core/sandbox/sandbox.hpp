// SPDX-License-Identifier: Apache-2.0
// The trainer sandbox (THREAT-MODEL.md, "a hostile model file or backend"): the process that
// opens a coordinator's model file, a TorchScript module or a vendor's backend shared object
// runs with kernel-enforced limits, set up before any of them is opened:
//   namespaces  user, mount, network, PID, IPC and UTS: no network but a loopback that is down,
//               its own PID 1, and a mount view of a private tmpfs holding read-only binds of the
//               system's libraries, the policy's paths and a few devices (no /proc, no /tmp)
//   Landlock    read-only access to those paths, writes only in the policy's write folders, no
//               execve, no TCP bind or connect, no signals or abstract sockets outside it
//               (each right as far as the kernel's Landlock ABI knows it)
//   seccomp     an allow-list (libseccomp) with no-new-privs: a call outside it fails with EPERM
//               and is logged by name once ("sandbox: denied system call socket")
//   limits      memory, CPU and pids through cgroup v2 where the host delegates it, else v1
//               (memory has an rlimit as the floor); no capabilities, no core dumps, and no
//               descriptor but 0, 1 and 2
// The process forks once (the PID namespace's init): the parent only waits, forwards signals and
// ends as its child ended, saying so when the child went past its memory limit.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fedl::core {

// off: no sandbox (said loudly); auto: every layer the host offers; strict: all of them or
// refuse to run.
enum class SandboxLevel
{
  off,
  automatic,
  strict,
};

std::string sandbox_level_name(SandboxLevel level);
// The level named `text` (off, auto, strict), if it names one.
std::optional<SandboxLevel> sandbox_level_named(std::string_view text);
// The same, or UsageError naming `what`.
SandboxLevel parse_sandbox_level(const std::string& text, const std::string& what);

struct SandboxLimits
{
  std::optional<std::uint64_t> memory_bytes;
  std::optional<double> cpus; // CPU time per wall-clock second
  std::optional<std::uint64_t> pids;
};

// "512M", "2G", "1.5GiB", "1048576": bytes, with binary multiples (K, M, G, T). UsageError naming
// `what` if it is not a size of at least 16 MiB.
std::uint64_t parse_memory_size(const std::string& text, const std::string& what);

struct SandboxPolicy
{
  SandboxLevel level = SandboxLevel::automatic;
  std::vector<std::filesystem::path> read;  // files and folders it may read (data, model, backends)
  std::vector<std::filesystem::path> write; // folders it may create and replace files in
  // Its outputs, written into private staging folders (write folders of their own): once it has
  // exited 0, the parent (outside) moves each staged file to its place; then it removes the
  // staging folders, whatever happened. So a trainer can write its outputs and nothing beside
  // them. (staged, final) pairs, each final in the folder that holds its staging folder.
  std::vector<std::pair<std::filesystem::path, std::filesystem::path>> publish;
  std::vector<std::filesystem::path> staging;
  SandboxLimits limits;
  std::string name = "fedl"; // for messages: "the trainer"
};

// What a sandboxed process runs under.
struct SandboxReport
{
  SandboxLevel level = SandboxLevel::off;
  std::vector<std::string> namespaces; // of user, mount, net, pid, ipc, uts
  int landlock_abi = 0;                // 0: no Landlock
  bool seccomp = false;
  std::string cgroup; // "v2", "v1" or "" (rlimits only)
  SandboxLimits limits;
  std::vector<std::string> missing; // "layer: why", for each layer the host did not give

  // Every layer on (what --sandbox strict demands).
  bool complete() const { return missing.empty() && level != SandboxLevel::off; }
  nlohmann::json to_json() const;
  // "namespaces user,mount,...; Landlock ABI 7; seccomp; cgroup v1 (memory 512 MiB)"
  std::string summary() const;
};

// Puts this process in the sandbox. It must be single-threaded and must not have opened what the
// sandbox guards yet. With level off, returns at once. Otherwise it forks: in the child (the one
// that returns, with what it runs under) every layer is on; the parent never returns (it exits as
// the child did). Under strict, a layer the host lacks throws Error naming it and what to do;
// under auto it is left off and named in the report's `missing`.
SandboxReport enter_sandbox(const SandboxPolicy& policy);

// What this host offers, without entering anything: user namespaces, the Landlock ABI, seccomp,
// and each cgroup controller (memory, cpu, pids) with its version and whether this process may
// use it. For fedl audit --host.
nlohmann::json sandbox_host_support();

} // namespace fedl::core
