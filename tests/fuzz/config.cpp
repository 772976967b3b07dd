// SPDX-License-Identifier: Apache-2.0
// Fuzz target "config": load_config (core/config/config.hpp) on the bytes of a fedl.json. Anything it
// accepts holds every value the file gives as given, passes the checks that serve and init
// apply, and its canonical text (config_text, what fedl init writes) loads back to the same
// configuration.
#include "fuzz.hpp"

#include "core/config/config.hpp"
#include "core/util/error.hpp"

using namespace fedl;
using nlohmann::json;

namespace {

// Every value the file gives is the value the configuration holds (as to_json writes it back):
// nothing was truncated or reinterpreted on the way. model.input_shape is normalised ("1, 28"
// becomes "1,28") and left out.
void
check_same(const json& given, const json& held, const std::string& path)
{
  for (const auto& [key, v] : given.items()) {
    const auto it = held.find(key);
    if (it == held.end() || path + key == "model.input_shape") {
      continue;
    }
    if (v.is_object() && it->is_object()) {
      check_same(v, *it, path + key + ".");
    } else if (v != *it) {
      std::fprintf(stderr, "%s%s: given %s, held %s\n", path.c_str(), key.c_str(), v.dump().c_str(),
                   it->dump().c_str());
      FEDL_FUZZ_CHECK(v == *it);
    }
  }
}

} // namespace

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
  check_same(json::parse(fuzz::as_text({data, size})), core::to_json(c), "");
  const auto text = core::config_text(c);
  const auto again = core::config_from_json(nlohmann::json::parse(text), "rewritten");
  FEDL_FUZZ_CHECK(core::config_text(again) == text);
  return 0;
}
