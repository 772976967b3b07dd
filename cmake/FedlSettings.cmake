# SPDX-License-Identifier: Apache-2.0
# INTERFACE targets that every first-party target links privately.
add_library(fedl_settings INTERFACE)
target_compile_features(fedl_settings INTERFACE cxx_std_20)
target_include_directories(fedl_settings INTERFACE ${PROJECT_SOURCE_DIR}/src)

add_library(fedl_warnings INTERFACE)
target_compile_options(fedl_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Woverloaded-virtual
  -Wcast-align -Wextra-semi)
if(FEDL_WARNINGS_AS_ERRORS)
  target_compile_options(fedl_warnings INTERFACE -Werror)
endif()

# The fastest linker that is installed: linking is most of an incremental rebuild.
include(CheckCXXSourceCompiles)
foreach(linker lld gold)
  find_program(FEDL_LD_${linker} ld.${linker})
  if(FEDL_LD_${linker})
    target_link_options(fedl_settings INTERFACE -fuse-ld=${linker})
    break()
  endif()
endforeach()
