// SPDX-License-Identifier: Apache-2.0
// Fuzz target "config": load_config (core/config.hpp) on the bytes of a fedl.json. Anything it
// accepts passes the checks that serve and init apply, and its canonical text (config_text, what
// fedl init writes) loads back to the same configuration.
#include "fuzz.hpp"

#include "core/config.hpp"
#include "core/error.hpp"

using namespace fedl;

extern "C" int
LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
  fuzz::quiet();
  const auto path = fuzz::scratch().write("fedl.json", {data, size});
  core::FederationConfig c;
  try {
    c = core::load_config(path);
  } catch (const core::Error& e) {
    fuzz::refused(e);
    return 0;
  }
  core::check_training(c.training);
  core::check_privacy(c.privacy);
  FEDL_FUZZ_CHECK(!c.model.arch.empty() && c.model.classes >= 1 && !c.model.input_shape.empty());
  const auto text = core::config_text(c);
  const auto again = core::config_from_json(nlohmann::json::parse(text), "rewritten");
  FEDL_FUZZ_CHECK(core::config_text(again) == text);
  return 0;
}
