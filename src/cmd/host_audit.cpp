// SPDX-License-Identifier: Apache-2.0
// fedl audit --host: what this host's sandbox enforces, measured rather than declared. It lists
// the layers the host offers, then starts a real sandboxed child (fedl __sandbox-probe, hidden)
// that loads the backends inside its sandbox and attempts each forbidden action; each is
// reported denied or allowed, and what the child claims is checked from outside where it can be
// (the listener saw no connection, no datagram arrived, no file appeared).
#include "cmd/commands.hpp"

#include "backends/loader.hpp"
#include "cmd/common.hpp"
#include "core/net/child.hpp"
#include "core/sandbox/sandbox.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fedl::cmd {

namespace {

// The probe's limits: small, so that going past them is quick (a sanitizer's shadow memory needs
// more).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr const char* probe_memory = "1G";
#else
constexpr const char* probe_memory = "256M";
#endif
constexpr std::uint64_t probe_pids = 32;
// What the probe exits with if `execve /bin/sh` ran the shell.
constexpr int exec_ran_status = 97;

struct ProbeOptions
{
  int tcp_port = 0;
  int udp_port = 0;
  fs::path allowed;
  fs::path secret;
  fs::path write;
  int parent = 0;
};

void
emit(const json& line)
{
  const auto text = line.dump() + "\n";
  (void)!::write(STDOUT_FILENO, text.data(), text.size());
}

void
result(const std::string& probe, const std::string& what, bool denied, const std::string& how)
{
  emit({{"probe", probe}, {"what", what}, {"result", denied ? "denied" : "allowed"}, {"how", how}});
}

// Denied when `rc` is negative (errno says how).
void
result_of(const std::string& probe, const std::string& what, long rc, const std::string& call)
{
  const int saved = errno;
  result(probe, what, rc < 0, rc < 0 ? fmt::format("{}: {}", call, std::strerror(saved)) : call + " succeeded");
}

sockaddr_in
loopback(int port)
{
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

void
probe_threads()
{
  // Threads count against the pids limit as processes do: start more than it allows.
  int gate[2] = {-1, -1};
  if (::pipe2(gate, O_CLOEXEC) != 0) {
    result("pids", "more threads than the pids limit", false, "cannot make a pipe to hold them");
    return;
  }
  std::vector<pthread_t> threads;
  int error = 0;
  const auto wait_on_gate = [](void* fd) -> void* {
    char c = 0;
    (void)!::read(static_cast<int>(reinterpret_cast<std::intptr_t>(fd)), &c, 1);
    return nullptr;
  };
  while (threads.size() < probe_pids + 16) {
    pthread_t t{};
    error = ::pthread_create(&t, nullptr, wait_on_gate, reinterpret_cast<void*>(static_cast<std::intptr_t>(gate[0])));
    if (error != 0) {
      break;
    }
    threads.push_back(t);
  }
  ::close(gate[1]);
  for (const auto t : threads) {
    ::pthread_join(t, nullptr);
  }
  ::close(gate[0]);
  const auto what = fmt::format("{} threads (the pids limit is {})", probe_pids + 16, probe_pids);
  result("pids", what, error != 0,
         error != 0 ? fmt::format("thread {}: {}", threads.size() + 1, std::strerror(error)) : "all started");
}

int
run_probe(const ProbeOptions& o)
{
  core::SandboxPolicy policy;
  policy.level = core::SandboxLevel::automatic;
  policy.name = "the probe";
  policy.read = {o.allowed};
  policy.limits.memory_bytes = core::parse_memory_size(probe_memory, "probe");
  policy.limits.pids = probe_pids;
  const auto report = enter_trainer_sandbox(policy);
  emit({{"sandbox", report.to_json()}, {"summary", report.summary()}});

  std::vector<backends::LoadFailure> failures;
  json loaded = json::array();
  for (const auto& b : backends::all_backends(&failures)) {
    loaded.push_back({{"name", b.api->name}, {"path", b.path.string()}, {"devices", b.devices}});
  }
  json failed = json::array();
  for (const auto& f : failures) {
    failed.push_back({{"path", f.path.string()}, {"reason", f.reason}});
  }
  emit({{"backends", loaded}, {"backend_failures", failed}});

  {
    std::ifstream in(o.allowed);
    std::string text;
    std::getline(in, text);
    emit({{"control", "read the one file it was given"}, {"ok", text == "allowed"}});
  }
  // TCP: a connection; UDP: a datagram.
  const auto reach = [](const std::string& probe, int type, int port) {
    const bool tcp = type == SOCK_STREAM;
    const auto what = fmt::format("{} to 127.0.0.1:{}", tcp ? "TCP connect" : "UDP datagram", port);
    const int fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      result_of(probe, what, -1, "socket");
      return;
    }
    const auto a = loopback(port);
    const auto* to = reinterpret_cast<const sockaddr*>(&a);
    result_of(probe, what, tcp ? ::connect(fd, to, sizeof a) : ::sendto(fd, "x", 1, 0, to, sizeof a),
              tcp ? "connect" : "sendto");
    ::close(fd);
  };
  reach("tcp", SOCK_STREAM, o.tcp_port);
  reach("udp", SOCK_DGRAM, o.udp_port);
  const auto try_open = [](const std::string& probe, const std::string& what, const fs::path& path, int flags) {
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
    result_of(probe, what, fd, "open");
    if (fd >= 0) {
      ::close(fd);
    }
  };
  try_open("read", "read a file outside its paths (" + o.secret.string() + ")", o.secret, O_RDONLY);
  try_open("shadow", "read /etc/shadow", "/etc/shadow", O_RDONLY);
  try_open("write", "create a file outside its paths (" + o.write.string() + ")", o.write, O_WRONLY | O_CREAT | O_EXCL);
  try_open("environ", "read /proc/1/environ", "/proc/1/environ", O_RDONLY);
  result_of("ptrace", fmt::format("ptrace its parent (pid {})", o.parent),
            ::ptrace(PTRACE_ATTACH, static_cast<pid_t>(o.parent), nullptr, nullptr), "ptrace");
  result_of("unshare", "make a new user namespace", ::unshare(CLONE_NEWUSER), "unshare");
  {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::_exit(0);
    }
    if (pid > 0) {
      ::waitpid(pid, nullptr, 0);
    }
    result_of("fork", "start a process", pid, "fork");
  }
  probe_threads();
  {
    char sh[] = "/bin/sh";
    char dash_c[] = "-c";
    auto command = fmt::format("exit {}", exec_ran_status);
    char* argv[] = {sh, dash_c, command.data(), nullptr};
    char* envp[] = {nullptr};
    result_of("exec", "execve /bin/sh", ::execve(sh, argv, envp), "execve");
  }
  // Last: past the memory limit, the kernel ends this process.
  emit({{"memory_start", fmt::format("allocate and touch twice the memory limit ({} x 2)", probe_memory)}});
  const auto chunk = std::size_t{16} << 20;
  for (std::uint64_t done = 0; done < 2 * *policy.limits.memory_bytes; done += chunk) {
    void* p = ::mmap(nullptr, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      result_of("memory", "allocate twice the memory limit", -1, "mmap");
      return 0;
    }
    std::memset(p, 1, chunk);
  }
  result("memory", "allocate twice the memory limit", false, "all of it was allocated and touched");
  return 0;
}

// ---- the audit's side ----

struct Listener
{
  core::UniqueFd fd;
  int port = 0;
};

Listener
listen_loopback(int type)
{
  Listener l{core::UniqueFd(::socket(AF_INET, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)), 0};
  auto a = loopback(0);
  socklen_t len = sizeof a;
  if (!l.fd || ::bind(l.fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      (type == SOCK_STREAM && ::listen(l.fd.get(), 4) != 0) ||
      ::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    throw core::Error("fedl audit --host: cannot listen on 127.0.0.1 for the probe: {}", std::strerror(errno));
  }
  l.port = ntohs(a.sin_port);
  return l;
}

// The probe's lines, in order, and how it ended.
struct ProbeRun
{
  std::vector<json> lines;
  int status = 0;
  std::string log;
};

ProbeRun
run_probe_child(const std::vector<std::string>& argv, const fs::path& log)
{
  int out[2] = {-1, -1};
  if (::pipe2(out, O_CLOEXEC) != 0) {
    throw core::Error("fedl audit --host: cannot make a pipe: {}", std::strerror(errno));
  }
  core::UniqueFd read_end(out[0]);
  core::UniqueFd write_end(out[1]);
  core::UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  // Its log (each denied system call, by name) goes to a file, read into the report.
  core::UniqueFd err(::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  const int saved_err = ::fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
  ::dup2(err.get(), STDERR_FILENO);
  pid_t pid = -1;
  try {
    pid = core::spawn_process(argv, null.get(), write_end.get());
  } catch (...) {
    ::dup2(saved_err, STDERR_FILENO);
    ::close(saved_err);
    throw;
  }
  ::dup2(saved_err, STDERR_FILENO);
  ::close(saved_err);
  write_end.reset();
  ProbeRun run;
  std::string buffer;
  std::array<char, 4096> chunk{};
  ssize_t n = 0;
  while ((n = ::read(read_end.get(), chunk.data(), chunk.size())) != 0) {
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 || buffer.size() > (1U << 20)) {
      break;
    }
    buffer.append(chunk.data(), static_cast<std::size_t>(n));
  }
  while (::waitpid(pid, &run.status, 0) < 0 && errno == EINTR) {
  }
  std::size_t start = 0;
  for (std::size_t end = buffer.find('\n'); end != std::string::npos; end = buffer.find('\n', start)) {
    auto line = json::parse(buffer.substr(start, end - start), nullptr, false);
    if (!line.is_discarded()) {
      run.lines.push_back(std::move(line));
    }
    start = end + 1;
  }
  std::ifstream in(log);
  run.log.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return run;
}

// The probe's findings, with what is checked from outside.
struct Findings
{
  json probes = json::array();
  bool memory_started = false;
  bool control_ok = false;

  json* find(const std::string& name)
  {
    for (auto& p : probes) {
      if (p["probe"] == name) {
        return &p;
      }
    }
    return nullptr;
  }
  // What the child said is overruled by what is seen from outside.
  void overrule(const std::string& name, const std::string& what, const std::string& how)
  {
    if (auto* p = find(name)) {
      (*p)["result"] = "allowed";
      (*p)["how"] = how;
    } else {
      probes.push_back({{"probe", name}, {"what", what}, {"result", "allowed"}, {"how", how}});
    }
  }
};

Findings
read_findings(const ProbeRun& run, json& out)
{
  Findings f;
  for (const auto& line : run.lines) {
    if (line.contains("sandbox")) {
      out["sandbox"] = line["sandbox"];
      out["sandbox"]["summary"] = line["summary"];
    } else if (line.contains("backends")) {
      out["backends"] = line["backends"];
      out["backend_failures"] = line["backend_failures"];
    } else if (line.contains("control")) {
      f.control_ok = line["ok"].get<bool>();
    } else if (line.contains("memory_start")) {
      f.memory_started = true;
    } else if (line.contains("probe")) {
      f.probes.push_back(line);
    }
  }
  if (!out.contains("sandbox")) {
    throw core::Error("fedl audit --host: the probe could not start its sandbox ({}): {}",
                      core::describe_wait_status(run.status), run.log);
  }
  return f;
}

void
check_from_outside(Findings& f, const ProbeRun& run, const Listener& tcp, const Listener& udp, const fs::path& dir)
{
  if (core::UniqueFd c(::accept4(tcp.fd.get(), nullptr, nullptr, SOCK_CLOEXEC)); c) {
    f.overrule("tcp", "TCP connect to 127.0.0.1", "the listener accepted a connection");
  }
  char byte = 0;
  if (::recv(udp.fd.get(), &byte, 1, MSG_DONTWAIT) == 1) {
    f.overrule("udp", "UDP datagram to 127.0.0.1", "the datagram arrived");
  }
  if (fs::exists(dir / "written.txt")) {
    f.overrule("write", "create a file outside its paths", "the file exists");
  }
  if (WIFEXITED(run.status) && WEXITSTATUS(run.status) == exec_ran_status) {
    f.overrule("exec", "execve /bin/sh", "the shell ran");
  }
  if (f.memory_started && f.find("memory") == nullptr) {
    // It ended while allocating: stopped at the limit (or by something else: say what).
    const bool at_limit = run.log.find("memory limit") != std::string::npos;
    const auto how = core::describe_wait_status(run.status);
    f.probes.push_back({{"probe", "memory"},
                        {"what", "allocate twice the memory limit"},
                        {"result", at_limit ? "denied" : "unknown"},
                        {"how", at_limit ? fmt::format("stopped at the limit ({})", how) : how}});
  }
}

std::string
host_text(const json& out, std::size_t allowed)
{
  const auto& host = out["host"];
  std::string text =
    fmt::format("host: {}; user namespaces {}; Landlock ABI {}; seccomp {}\n", host["kernel"].get<std::string>(),
                host["user_namespaces"]["supported"].get<bool>() ? "yes" : "no", host["landlock_abi"].get<long>(),
                host["seccomp"].get<bool>() ? "yes" : "no");
  for (const auto& [controller, c] : host["cgroup"].items()) {
    text += fmt::format("cgroup {}: {}\n", controller,
                        c["usable"].get<bool>() ? c["version"].get<std::string>()
                                                : fmt::format("not usable ({})", c["why"].get<std::string>()));
  }
  text += out["sandbox"]["summary"].get<std::string>() + "\n";
  std::vector<std::string> names;
  for (const auto& b : out.value("backends", json::array())) {
    names.push_back(fmt::format("{} ({})", b["name"].get<std::string>(), fmt::join(b["devices"], ", ")));
  }
  text += fmt::format("backends, loaded inside the sandbox: {}\n",
                      names.empty() ? std::string("none") : fmt::format("{}", fmt::join(names, "; ")));
  for (const auto& p : out["probes"]) {
    text += fmt::format("  {:<8} {:<56} {}\n", p["result"].get<std::string>(), p["what"].get<std::string>(),
                        p["how"].get<std::string>());
  }
  if (!out["control_read_ok"].get<bool>()) {
    text += "the probe could not read the one file it was given: its results say nothing\n";
  }
  const auto total = out["probes"].size();
  text += allowed == 0 ? fmt::format("all {} forbidden actions were denied\n", total)
                       : fmt::format("{} of {} forbidden actions were allowed\n", allowed, total);
  return text;
}

int
run_host_audit()
{
  json out;
  out["host"] = core::sandbox_host_support();
  utsname u{};
  ::uname(&u);
  out["host"]["kernel"] = fmt::format("{} {}", u.sysname, u.release);

  auto dir_template = (fs::temp_directory_path() / "fedl-audit-XXXXXX").string();
  if (::mkdtemp(dir_template.data()) == nullptr) {
    throw core::Error("fedl audit --host: cannot make a folder in {}: {}", fs::temp_directory_path().string(),
                      std::strerror(errno));
  }
  const fs::path dir = dir_template;
  struct Cleanup
  {
    fs::path dir;
    ~Cleanup()
    {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{dir};
  core::atomic_write(dir / "allowed.txt", "allowed\n");
  core::atomic_write(dir / "secret.txt", "secret\n");
  const auto tcp = listen_loopback(SOCK_STREAM);
  const auto udp = listen_loopback(SOCK_DGRAM);
  const auto run =
    run_probe_child({core::self_executable().string(), "--log-format", globals().log_format, "__sandbox-probe", "--tcp",
                     std::to_string(tcp.port), "--udp", std::to_string(udp.port), "--allowed",
                     (dir / "allowed.txt").string(), "--secret", (dir / "secret.txt").string(), "--write",
                     (dir / "written.txt").string(), "--parent", std::to_string(::getpid())},
                    dir / "probe.log");
  auto findings = read_findings(run, out);
  check_from_outside(findings, run, tcp, udp, dir);
  // Each denied system call the sandbox logged, by name.
  json logged = json::array();
  constexpr std::string_view marker = "denied system call ";
  for (auto at = run.log.find(marker); at != std::string::npos; at = run.log.find(marker, at + 1)) {
    const auto start = at + marker.size();
    logged.push_back(run.log.substr(start, run.log.find(' ', start) - start));
  }
  out["logged_denials"] = logged;
  // A probe the child never got to (it ended early) is not a denial.
  for (const char* name :
       {"tcp", "udp", "read", "shadow", "write", "environ", "ptrace", "unshare", "fork", "pids", "exec", "memory"}) {
    if (findings.find(name) == nullptr) {
      findings.probes.push_back(
        {{"probe", name},
         {"what", name},
         {"result", "not run"},
         {"how", fmt::format("the probe ended first ({})", core::describe_wait_status(run.status))}});
    }
  }
  out["probes"] = findings.probes;
  std::size_t allowed = 0;
  for (const auto& p : findings.probes) {
    allowed += p["result"] != "denied" ? 1 : 0;
  }
  out["all_denied"] = allowed == 0 && findings.control_ok;
  out["control_read_ok"] = findings.control_ok;
  print_result(out, host_text(out, allowed));
  return out["all_denied"].get<bool>() ? 0 : static_cast<int>(core::ExitCode::verify);
}

} // namespace

int
audit_host()
{
  return run_host_audit();
}

Command
add_sandbox_probe(CLI::App& parent)
{
  auto opt = std::make_shared<ProbeOptions>();
  auto* app = parent.add_subcommand("__sandbox-probe", "Attempt what the sandbox forbids (for fedl audit --host)");
  app->group(""); // hidden: started by fedl audit --host
  app->add_option("--tcp", opt->tcp_port)->required();
  app->add_option("--udp", opt->udp_port)->required();
  app->add_option("--allowed", opt->allowed)->required();
  app->add_option("--secret", opt->secret)->required();
  app->add_option("--write", opt->write)->required();
  app->add_option("--parent", opt->parent)->required();
  return {app, [opt] { return run_probe(*opt); }};
}

} // namespace fedl::cmd
