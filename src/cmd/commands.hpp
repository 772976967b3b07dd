// SPDX-License-Identifier: Apache-2.0
// The table of fedl's subcommands.
//
// Adding a subcommand:
//  1. write src/cmd/NAME.cpp with `Command add_NAME(CLI::App&)` (options struct, validation,
//     calls into core and backends; no business logic) and add it to add_all() in commands.cpp;
//  2. write man/fedl-NAME.1 (tests/docs/check_manpages.py fails until every option is there);
//  3. add tests/e2e/suites/NAME.bash;
//  4. run `make completions` and commit completions/.
#pragma once

#include <functional>
#include <vector>

namespace CLI {
class App;
}

namespace fedl::cmd {

struct Command
{
  CLI::App* app;
  std::function<int()> run;
};

Command add_init(CLI::App& parent);
Command add_train(CLI::App& parent);
Command add_aggregate(CLI::App& parent);
Command add_audit(CLI::App& parent);
Command add_eval(CLI::App& parent);
Command add_inspect(CLI::App& parent);
Command add_completion(CLI::App& parent);
Command add_doc(CLI::App& parent);
Command add_worker(CLI::App& parent);
Command add_fork_server(CLI::App& parent);
Command add_serve(CLI::App& parent);
Command add_status(CLI::App& parent);
Command add_report(CLI::App& parent);
Command add_join(CLI::App& parent);
Command add_sandbox_probe(CLI::App& parent);
// fedl audit --host (host_audit.cpp).
int audit_host();

// Registers every subcommand on `app`, in the order `fedl --help` lists them.
std::vector<Command> add_all(CLI::App& app);

// fedl's main: parses argv, runs the command, returns its exit status (cmd/dispatch.cpp).
int run_fedl(int argc, char** argv);

} // namespace fedl::cmd
