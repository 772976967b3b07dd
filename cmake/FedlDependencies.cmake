# SPDX-License-Identifier: Apache-2.0
# Every dependency comes from a Debian package; nothing is downloaded.
find_package(CLI11 REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(fmt REQUIRED)
find_package(OpenSSL 3 REQUIRED)
find_package(ZLIB REQUIRED)
find_package(tl-expected REQUIRED)
find_package(Threads REQUIRED)
# The trainer sandbox's seccomp filter (libseccomp-dev).
find_package(PkgConfig REQUIRED)
pkg_check_modules(SECCOMP REQUIRED IMPORTED_TARGET libseccomp)

# The PLD accountant's FFT: KISS FFT's header-only C++ template (libkissfft-dev, BSD-3-Clause).
find_path(KISSFFT_INCLUDE_DIR kissfft.hh PATH_SUFFIXES kissfft REQUIRED)

find_path(ASIO_INCLUDE_DIR asio.hpp REQUIRED)
add_library(fedl_asio INTERFACE)
target_include_directories(fedl_asio SYSTEM INTERFACE ${ASIO_INCLUDE_DIR})
target_compile_definitions(fedl_asio INTERFACE ASIO_STANDALONE ASIO_NO_DEPRECATED)

if(FEDL_BUILD_TESTS)
  find_package(doctest REQUIRED)
endif()
