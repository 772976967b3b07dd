// SPDX-License-Identifier: Apache-2.0
// fedl: the command line is cmd/dispatch.cpp's.
#include "cmd/commands.hpp"

int
main(int argc, char** argv)
{
  return fedl::cmd::run_fedl(argc, argv);
}
