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

# Sanitizer builds for developers (make asan, make tsan; never CI): every first-party target,
# the torch backend and the test programs included, since they all link fedl_settings.
#   address: AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer; any UB report is fatal.
#   thread:  ThreadSanitizer.
set(FEDL_SANITIZE "" CACHE STRING "Build with sanitizers: address (ASan+UBSan) or thread (TSan); empty for none")
set_property(CACHE FEDL_SANITIZE PROPERTY STRINGS "" address thread)
if(FEDL_SANITIZE STREQUAL "address")
  set(fedl_sanitize_flags -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
elseif(FEDL_SANITIZE STREQUAL "thread")
  set(fedl_sanitize_flags -fsanitize=thread -fno-omit-frame-pointer)
  # GCC warns at every use of Asio's std_fenced_block that TSan does not model fences (about 80
  # times); Asio's queues hand handlers over under mutexes, which TSan does see.
  set(fedl_sanitize_compile_only -Wno-tsan)
elseif(NOT FEDL_SANITIZE STREQUAL "")
  message(FATAL_ERROR "FEDL_SANITIZE is '${FEDL_SANITIZE}'; expected address, thread or nothing")
endif()
if(fedl_sanitize_flags)
  target_compile_options(fedl_settings INTERFACE ${fedl_sanitize_flags} ${fedl_sanitize_compile_only})
  target_link_options(fedl_settings INTERFACE ${fedl_sanitize_flags})
endif()
