// SPDX-License-Identifier: Apache-2.0
// The loader against the fake backend that the build puts beside this test program (the
// executable's own folder is on the search path, DESIGN §9).
#include "backends/loader.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

using namespace fedl;

TEST_SUITE_BEGIN("backends");

TEST_CASE("backends::all_backends finds the plugin beside the executable")
{
  const auto& all = backends::all_backends();
  REQUIRE(all.size() >= 1);
  const auto it =
    std::find_if(all.begin(), all.end(), [](const auto& b) { return std::string(b.api->name) == "fake"; });
  REQUIRE(it != all.end());
  CHECK(it->devices == std::vector<std::string>{"npu:0"});
  CHECK(std::string(it->api->runtime) == "fake runtime 1.0");
}

TEST_CASE("backends::resolve_device: auto prefers an accelerator, names pick a backend, absent is exit 2")
{
  CHECK(backends::resolve_device("auto").second == "npu:0");
  CHECK(backends::resolve_device("fake").second == "npu:0");
  CHECK(backends::resolve_device("npu:0").first->api->name == std::string("fake"));
  try {
    (void)backends::resolve_device("cuda:3");
    FAIL("resolved an absent device");
  } catch (const core::Error& e) {
    CHECK(e.code() == core::ExitCode::usage);
    CHECK(std::string(e.what()).find("present: npu:0") != std::string::npos);
  }
}

TEST_CASE("backends::Model turns a backend's failure status into the matching exit code")
{
  const auto [b, dev] = backends::resolve_device("fake");
  try {
    (void)backends::Model::create(*b, dev, "logreg", {4}, 2, 0);
    FAIL("created");
  } catch (const core::Error& e) {
    CHECK(e.code() == core::ExitCode::usage);
    CHECK(std::string(e.what()).find("logreg") != std::string::npos);
  }
}

TEST_SUITE_END();
