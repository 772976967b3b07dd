# SPDX-License-Identifier: Apache-2.0
# Helpers for the end-to-end suites. Each test function runs in its own folder.

# Marks the test failed with a message, and goes on.
fail()
{
  echo "FAILED: $*"
  FAILED=1
}

# fedl_expect CODE ARGS...: runs fedl, keeping stdout in ./out and stderr in ./err, and fails
# the test unless it exits with CODE.
fedl_expect()
{
  local want=$1
  shift
  "$FEDL" "$@" >out 2>err
  local rc=$?
  if [[ $rc != "$want" ]]; then
    fail "fedl $* exited $rc, expected $want"
    echo "--- stdout"; cat out; echo "--- stderr"; cat err
    return 1
  fi
  return 0
}

# expect_in FILE TEXT: FILE contains TEXT (fixed string).
expect_in()
{
  if ! grep -qF -- "$2" "$1"; then
    fail "$1 does not contain '$2'"
    echo "--- $1"; cat "$1"
  fi
}

expect_not_in()
{
  if grep -qF -- "$2" "$1"; then
    fail "$1 contains '$2'"
  fi
}

# expect_no_file PATH...: none of the paths exists, and no temporary file is left beside them.
expect_no_file()
{
  local p
  for p in "$@"; do
    [[ -e $p ]] && fail "$p exists but should not"
    compgen -G "$(dirname "$p")/.$(basename "$p").tmp-*" >/dev/null && fail "a temporary file of $p was left"
  done
  return 0
}

# json_get FILE EXPR: evaluates a Python expression over the JSON document in FILE (as j).
json_get()
{
  "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# check_py EXPR [MESSAGE]: fails the test unless the Python expression is true.
check_py()
{
  if [[ $("$PY" -c "print(bool($1))") != True ]]; then
    fail "${2:-$1}"
  fi
}

# The bundled digits split 80/20 (every fifth row is a test row): a fixed, seed-free split.
digits_split()
{
  gzip -dc "$DATA/digits.csv.gz" | awk 'NR % 5 != 0' > digits-train.csv
  gzip -dc "$DATA/digits.csv.gz" | awk 'NR % 5 == 0' > digits-test.csv
}

# free_port: prints a TCP port that is free on 127.0.0.1 (the kernel's choice for port 0).
free_port()
{
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# FEDL_E2E_TIME_SCALE (a whole number, default 1): the factor by which the suites' own waits are
# longer in a slow build (tests/sanitizers/run sets it for make asan and make tsan). It scales
# wait_for's SECONDS (so every wait_log, wait_exit and expect_exit) and the DURATION of
# `timeout DURATION COMMAND...` in the suites; the deadlines that a test gives fedl itself
# (--round-timeout, --heartbeat, ...) stay as they are.
TIME_SCALE=${FEDL_E2E_TIME_SCALE:-1}
[[ $TIME_SCALE =~ ^[1-9][0-9]*$ ]] || { echo "FEDL_E2E_TIME_SCALE must be a whole number >= 1" >&2; exit 2; }
if ((TIME_SCALE > 1)); then
  timeout()
  {
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then
      command timeout "$(($1 * TIME_SCALE))" "${@:2}"
    else
      command timeout "$@"
    fi
  }
fi

# wait_for SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds; fails (status 1) if it
# has not within SECONDS (times FEDL_E2E_TIME_SCALE).
wait_for()
{
  local end=$((SECONDS + $1 * TIME_SCALE))
  shift
  until "$@"; do
    ((SECONDS >= end)) && return 1
    sleep 0.1
  done
  return 0
}
