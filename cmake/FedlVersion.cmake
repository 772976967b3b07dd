# SPDX-License-Identifier: Apache-2.0
# The version string: `git describe` where the tree is a git checkout, else the project version.
set(FEDL_VERSION_STRING ${PROJECT_VERSION})
find_package(Git QUIET)
if(GIT_FOUND AND EXISTS ${PROJECT_SOURCE_DIR}/.git)
  execute_process(COMMAND ${GIT_EXECUTABLE} describe --tags --always --dirty
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} OUTPUT_VARIABLE _describe
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _describe)
    set(FEDL_VERSION_STRING "${PROJECT_VERSION} (${_describe})")
  endif()
endif()
configure_file(${PROJECT_SOURCE_DIR}/src/core/util/version.cpp.in ${PROJECT_BINARY_DIR}/generated/version.cpp @ONLY)
