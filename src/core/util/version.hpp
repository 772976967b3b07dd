// SPDX-License-Identifier: Apache-2.0
#pragma once

namespace fedl::core {

// "0.1.0 (git describe)" as configured by cmake/FedlVersion.cmake.
const char* version_string() noexcept;

} // namespace fedl::core
