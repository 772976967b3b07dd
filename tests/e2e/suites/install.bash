# SPDX-License-Identifier: Apache-2.0
# make install's layout: the binary, its backend where the binary looks for it, man pages and
# completions where man and the shells look for them.

suite_probe()
{
  [[ -n ${FEDL_BUILD_DIR:-} && -f $FEDL_BUILD_DIR/cmake_install.cmake ]] || { echo "FEDL_BUILD_DIR not set"; return 1; }
}

test_install_layout_and_installed_binary_runs()
{
  cmake --install "$FEDL_BUILD_DIR" --prefix "$PWD/prefix" >install.log 2>&1 || { fail "cmake --install failed"; cat install.log; return; }
  local p=$PWD/prefix f
  for f in bin/fedl lib/fedl/backends/libfedl-backend-torch.so share/man/man1/fedl.1 share/man/man1/fedl-train.1 \
    share/man/man1/fedl-eval.1 share/man/man5/fedl-files.5 share/bash-completion/completions/fedl \
    share/zsh/site-functions/_fedl share/fish/vendor_completions.d/fedl.fish; do
    [[ -f $p/$f ]] || fail "make install did not install $f"
  done
  # The installed binary finds its backend in ../lib/fedl/backends, with nothing else around.
  FEDL_BACKEND_PATH= "$p/bin/fedl" --version >out 2>err || fail "installed fedl --version failed"
  expect_in out "$p/lib/fedl/backends/libfedl-backend-torch.so"
  FEDL_BACKEND_PATH= "$p/bin/fedl" -q train --data "$DATA/iris.csv" --no-header --arch logreg --save-model m.st ||
    fail "installed fedl cannot train"
  man -l "$p/share/man/man1/fedl-train.1" >/dev/null 2>&1 || mandoc "$p/share/man/man1/fedl-train.1" >/dev/null ||
    fail "the installed man page does not render"
}
