// SPDX-License-Identifier: Apache-2.0
#include "cmd/commands.hpp"

#include <CLI/CLI.hpp>

namespace fedl::cmd {

std::vector<Command>
add_all(CLI::App& app)
{
  return {
    add_init(app),       add_train(app), add_eval(app),      add_inspect(app),     add_serve(app),
    add_status(app),     add_join(app),  add_aggregate(app), add_audit(app),       add_report(app),
    add_completion(app), add_doc(app),   add_worker(app),    add_fork_server(app), add_sandbox_probe(app),
  };
}

} // namespace fedl::cmd
