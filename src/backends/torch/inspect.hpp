// SPDX-License-Identifier: Apache-2.0
// Inspecting a TorchScript module before a site runs it: the walk of every method's graph against
// the allow-list (torchscript-allow-list.txt, which says what is refused and why).
#pragma once

#include <string>

namespace fedl::backends::torch_backend {

// The report on the module at `path`, as JSON text (fedl-inspect(1)): "verdict" ("allowed" or
// "refused"), "refused" and "needs_dp_off" (each {"operator", "method", "source", "reason"}),
// "operators" (counts), "methods", "parameters" and "buffers" (name, shape, dtype) and
// "allow_list_version". The archive's code is read before anything of it runs: an archive whose
// code defines __setstate__ (which loading would run) is refused without being loaded. Throws
// std::runtime_error (or c10::Error) if the file is not a TorchScript archive.
std::string inspect_torchscript(const std::string& path);

} // namespace fedl::backends::torch_backend
