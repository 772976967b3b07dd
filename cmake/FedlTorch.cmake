# SPDX-License-Identifier: Apache-2.0
# LibTorch: Debian's libtorch-dev (CPU), or an upstream LibTorch 2.x with CUDA through
# CMAKE_PREFIX_PATH. Only the backend module links it, so its ABI flags stay there; the
# backend's C interface means no C++ type crosses between the two.
find_package(Torch REQUIRED)
message(STATUS "LibTorch ${Torch_VERSION} from ${Torch_DIR} (flags: ${TORCH_CXX_FLAGS})")
