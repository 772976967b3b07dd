#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# The committed completion scripts must equal what `fedl completion SHELL` prints now, so a flag
# added to the CLI without `make completions` fails here. Each script must also load in its shell
# where that shell is installed (bash always is).
set -u
fedl=$1 dir=$2
rc=0
for pair in bash:fedl.bash zsh:_fedl fish:fedl.fish; do
  shell=${pair%%:*} file=${pair#*:}
  if ! diff -u "$dir/$file" <("$fedl" completion "$shell"); then
    echo "FAIL: completions/$file is out of date: run 'make completions' and commit it"
    rc=1
  else
    echo "ok: completions/$file matches 'fedl completion $shell'"
  fi
done
# The bash script must define the completion, and complete a flag and a choice.
out=$(bash -c '
  source "$1"
  COMP_WORDS=(fedl train --optim); COMP_CWORD=2; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl train --optimizer ""); COMP_CWORD=3; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl tr); COMP_CWORD=1; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl train --arch m); COMP_CWORD=3; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl serve --strategy fedad); COMP_CWORD=3; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl init --split d); COMP_CWORD=3; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl join --device c); COMP_CWORD=3; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl train --h); COMP_CWORD=2; _fedl; echo "${COMPREPLY[*]}"
  COMP_WORDS=(fedl completion ""); COMP_CWORD=2; _fedl; echo "${COMPREPLY[*]}"
  cd "$(mktemp -d)" && mkdir wsdir && touch afile && trap "rm -rf \"$PWD\"" EXIT
  COMP_WORDS=(fedl serve ""); COMP_CWORD=2; _fedl; echo "${COMPREPLY[*]}"
' _ "$dir/fedl.bash")
# Values offered for options that take forms with parameters; --help once after a command; the
# shells of `fedl completion`; only folders for a workspace.
expected=$'--optimizer\nsgd adam\ntrain\nmlp:64 mlp:128 mlp:128,64\nfedadam fedadagrad\ndirichlet:0.5\ncpu cuda cuda:0\n--help --header\nbash zsh fish\nwsdir'

if [[ $out != "$expected" ]]; then
  echo "FAIL: bash completion gave:"; echo "$out"; echo "expected:"; echo "$expected"; rc=1
else
  echo "ok: bash completion completes commands, flags and choices"
fi
exit $rc
