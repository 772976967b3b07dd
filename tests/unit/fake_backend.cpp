// SPDX-License-Identifier: Apache-2.0
// A backend shared object for the loader's tests: it reports one device, "npu:0", and can
// create no model. It shows that a third party's backend plugs in through backend.h alone.
#include "backends/backend.h"

namespace {

const char* g_error = "";

size_t
device_count()
{
  return 1;
}

const char*
device_name(size_t i)
{
  return i == 0 ? "npu:0" : nullptr;
}

const char*
last_error()
{
  return g_error;
}

void
set_threads(int32_t)
{
}

int
model_create(const char* spec, int32_t, const int64_t*, int64_t, uint64_t, const char*, fedl_model**)
{
  g_error = spec;
  return FEDL_STATUS_USAGE;
}

int
model_load_torchscript(const char*, const char*, fedl_model**)
{
  g_error = "the fake backend cannot load TorchScript";
  return FEDL_STATUS_VERIFY;
}

} // namespace

extern "C" __attribute__((visibility("default"))) const fedl_backend_v1*
fedl_backend_entry(uint32_t abi_version)
{
  static const fedl_backend_v1 table{FEDL_BACKEND_ABI_VERSION,
                                     "fake",
                                     "fake runtime 1.0",
                                     device_count,
                                     device_name,
                                     last_error,
                                     set_threads,
                                     model_create,
                                     model_load_torchscript,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr};
  return abi_version == FEDL_BACKEND_ABI_VERSION ? &table : nullptr;
}
