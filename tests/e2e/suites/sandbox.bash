# SPDX-License-Identifier: Apache-2.0
# The trainer sandbox against a hostile backend plug-in (tests/e2e/hostile_backend.cpp, built
# into $FEDL_BUILD_DIR/tests/hostile): its load-time constructor, run inside a site's trainer,
# tries to reach the network, read another site's data and the site's key, write outside, run a
# shell, fork-bomb and eat memory. Each attempt must fail, the site must stay up, and the other
# sites' rounds must complete; fedl audit --host must find every probe denied. Real kernel
# features: the suite is skipped on a kernel without user namespaces, Landlock or seccomp.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

HOSTILE_DIR=${FEDL_BUILD_DIR:-$FEDL_SOURCE_DIR/build}/tests/hostile

suite_probe()
{
  [[ -f $HOSTILE_DIR/libfedl-backend-hostile.so ]] || { echo "the hostile backend is not built ($HOSTILE_DIR)"; return 1; }
  local host
  host=$("$FEDL" --json audit --host 2>/dev/null)
  "$PY" - "$host" <<'PY' || return 1
import json, sys
try:
    h = json.loads(sys.argv[1])["host"]
except Exception:
    print("fedl audit --host gave no report"); sys.exit(1)
missing = []
if not h["user_namespaces"]["supported"]:
    missing.append("user namespaces (" + h["user_namespaces"].get("why", "") + ")")
if h["landlock_abi"] < 1:
    missing.append("Landlock")
if not h["seccomp"]:
    missing.append("seccomp")
if missing:
    print("this host does not offer " + ", ".join(missing) + " (a chroot, for one, has no user namespaces)"); sys.exit(1)
PY
}

# listen_bg: a TCP and a UDP listener on 127.0.0.1:$LISTEN_PORT that write what reaches them to
# ./reached.
listen_bg()
{
  LISTEN_PORT=$(free_port) || return
  "$PY" - "$LISTEN_PORT" <<'PY' >reached 2>&1 &
import select, socket, sys
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", port)); t.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", port))
while True:
    for s in select.select([t, u], [], [])[0]:
        if s is t:
            c, a = t.accept(); print("tcp connection from", a, c.recv(64), flush=True); c.close()
        else:
            print("udp datagram", u.recvfrom(64), flush=True)
PY
  BG+=("$!")
  sleep 0.3
}

# The attempts every hostile trainer must report denied (and never DONE).
expect_contained()
{
  local log=$1
  local attempt
  for attempt in "tcp connect: denied" "udp send: denied" "read /etc/shadow: denied" \
    "read $PWD/ws/clients/site-1/data/train.csv: denied" "read $PWD/ws/clients/site-3/client.key: denied" \
    "create $DROP: denied" "fork and execve /bin/sh: denied" "execve /bin/sh: denied"; do
    expect_in "$log" "hostile: $attempt"
  done
  expect_not_in "$log" ": DONE"
  expect_in "$log" "sandbox: denied system call socket"
  expect_in "$log" "sandbox: denied system call execve"
  [[ -s reached ]] && fail "the listener was reached: $(cat reached)"
  expect_no_file "$DROP" "$DROP.sh"
}

# hostile_env: the environment that arms the hostile backend's constructor.
hostile_env()
{
  echo "HOSTILE_PORT=$LISTEN_PORT" \
    "HOSTILE_READ=/etc/shadow:$PWD/ws/clients/site-1/data/train.csv:$PWD/ws/clients/site-3/client.key" \
    "HOSTILE_DROP=$1"
}

# A 3-site federation whose site-3 runs with the hostile backend on FEDL_BACKEND_PATH: for the
# first 3 rounds selected with --device hostile (with a fork bomb), then, when the coordinator
# resumes with a quorum of all 3 sites for rounds 4 and 5, joined again with the honest cpu backend
# while the hostile one still loads beside it. Every attempt is denied both times, the other
# sites' rounds complete while site-3 fails its tasks (it stays up and takes each next one), and
# its next tasks with the honest backend succeed.
test_a_hostile_backend_is_contained_and_the_site_recovers()
{
  trap net_cleanup EXIT
  DROP=${TMPDIR:-/tmp}/fedl-hostile-drop-$$
  rm -f "$DROP" "$DROP.sh"
  listen_bg || return
  net_init 3 5 || return
  serve_bg --min-clients 2 --rounds 3 --heartbeat 1
  join_bg site-1
  join_bg site-2
  # --max-failures 0: the hostile backend fails every task alike, and this test is about the site
  # taking the next task after each (the default would stop it after three; suites/failing.bash).
  # shellcheck disable=SC2046
  env $(hostile_env "$DROP") HOSTILE_BOMB=1 FEDL_BACKEND_PATH="$HOSTILE_DIR" \
    "$FEDL" join ws/clients/site-3 --data ws/clients/site-3/data/train.csv --no-header --threads 1 --retry-max 1 \
    --device hostile --max-failures 0 >site-3.out 2>site-3.log &
  JOIN[site-3]=$!
  BG+=("$!")
  expect_exit "$SERVE" 120 0 "fedl serve (rounds 1-3)"
  local k
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k (rounds 1-3)"; done
  [[ $(grep -c "no update for this task" site-3.log) -ge 2 ]] ||
    fail "site-3 did not fail a task and take the next: $(grep -c 'no update for this task' site-3.log) failed"
  expect_contained site-3.log
  expect_in site-3.log "hostile: fork bomb: denied (0 processes"
  grep -Eq "hostile: thread bomb: denied \(([0-9]|[1-9][0-9]|[1-9][0-9][0-9]) threads" site-3.log ||
    fail "the thread bomb was not stopped below 1000 threads: $(grep 'thread bomb' site-3.log)"
  expect_in site-3.log "sandbox auto: namespaces user,mount,net,pid,ipc,uts; Landlock ABI"

  # Rounds 4 and 5 need all three sites: site-3 now chooses the honest backend.
  serve_bg --min-clients 3 --heartbeat 1
  join_bg site-1
  join_bg site-2
  # shellcheck disable=SC2046
  env $(hostile_env "$DROP") FEDL_BACKEND_PATH="$HOSTILE_DIR" \
    "$FEDL" join ws/clients/site-3 --data ws/clients/site-3/data/train.csv --no-header --threads 1 --retry-max 1 \
    --device cpu >site-3b.out 2>site-3b.log &
  JOIN[site-3]=$!
  BG+=("$!")
  expect_exit "$SERVE" 120 0 "fedl serve (rounds 4-5)"
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k (rounds 4-5)"; done
  expect_in site-3b.log "round 5: update sent"
  expect_contained site-3b.log
  expect_rounds 5
  expect_ledger "all(any(p['site'] == 'site-3' for p in b['participants']) for b in R[3:])" \
    "site-3 is not among rounds 4 and 5's participants"
}

# The control: the same constructor without the sandbox does what it tries (so the test above
# can fail).
test_without_the_sandbox_the_hostile_backend_gets_through()
{
  trap net_cleanup EXIT
  DROP=$PWD/outside/dropped
  mkdir -p outside outputs
  listen_bg || return
  "$FEDL" -q init ws --clients 3 --arch mlp:8 --partition "$DATA/iris.csv" --no-header --split iid --seed 1 \
    --listen 127.0.0.1:1 >init.log 2>&1 || { fail "fedl init failed"; cat init.log; return; }
  # shellcheck disable=SC2046
  env $(hostile_env "$DROP") FEDL_BACKEND_PATH="$HOSTILE_DIR" "$FEDL" train --sandbox off --device hostile \
    --data ws/clients/site-3/data/train.csv --no-header --arch mlp:8 --out outputs/u.st >out 2>err
  expect_in err "sandbox off: fedl train runs with all of this user's access"
  expect_in err "hostile: read $PWD/ws/clients/site-1/data/train.csv: DONE"
  expect_in err "hostile: read $PWD/ws/clients/site-3/client.key: DONE"
  expect_in err "hostile: tcp connect: DONE"
  expect_in err "hostile: create $DROP: DONE"
  wait_for 5 grep -q "tcp connection" reached || fail "the listener saw no connection"
  # With it: the same command is contained; it may not even write beside its own output.
  rm -f "$DROP" "$DROP.sh" reached
  listen_bg || return
  # shellcheck disable=SC2046
  env $(hostile_env "$PWD/outputs/beside") FEDL_BACKEND_PATH="$HOSTILE_DIR" "$FEDL" train --device hostile \
    --data ws/clients/site-3/data/train.csv --no-header --arch mlp:8 --out outputs/u.st >out 2>err
  expect_not_in err ": DONE"
  expect_in err "hostile: read $PWD/ws/clients/site-3/client.key: denied"
  expect_in err "hostile: create $PWD/outputs/beside: denied"
  expect_no_file "$DROP" outputs/beside outputs/u.st
  if compgen -G "outputs/.fedl-train-*" >/dev/null; then fail "a staging folder was left in outputs/"; fi
  # An honest run writes its outputs there, moved into place from its staging folder.
  fedl_expect 0 train --data ws/clients/site-3/data/train.csv --no-header --arch mlp:8 --out outputs/u.st --save-model outputs/m.st
  [[ -s outputs/u.st && -s outputs/m.st ]] || fail "the outputs were not written"
  if compgen -G "outputs/.fedl-train-*" >/dev/null; then fail "a staging folder was left in outputs/"; fi
}

# Memory past --memory-limit ends the task (the kernel stops the trainer, the site says why),
# the site stays up, and once the plug-in is gone its next task succeeds.
test_memory_past_the_limit_ends_the_task_and_the_site_takes_the_next()
{
  trap net_cleanup EXIT
  if ! "$FEDL" --json audit --host | "$PY" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["host"]["cgroup"]["memory"]["usable"] else 1)'; then
    echo "no usable cgroup memory controller: skipped"
    return 0
  fi
  mkdir -p plugins
  cp "$HOSTILE_DIR/libfedl-backend-hostile.so" plugins/
  net_init 3 6 || return
  serve_bg --min-clients 2 --round-timeout 20 --heartbeat 1
  join_bg site-1
  join_bg site-2
  HOSTILE_MEMORY_MB=2048 FEDL_BACKEND_PATH=$PWD/plugins "$FEDL" join ws/clients/site-3 \
    --data ws/clients/site-3/data/train.csv --no-header --threads 1 --retry-max 1 --device cpu \
    --memory-limit 512M >site-3.out 2>site-3.log &
  JOIN[site-3]=$!
  BG+=("$!")
  wait_log site-3.log "the trainer went past its memory limit of 512 MiB and was stopped" 60 || { cat site-3.log; return; }
  expect_not_in site-3.log "hostile: allocate: DONE"
  kill -0 "${JOIN[site-3]}" 2>/dev/null || fail "site-3 did not stay up"
  rm plugins/libfedl-backend-hostile.so
  wait_log site-3.log "update sent" 90 || { cat site-3.log; return; }
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_rounds 6
}

# fedl audit --host on this machine: every layer on, and a real sandboxed child denied each
# forbidden action.
test_audit_host_finds_every_probe_denied()
{
  fedl_expect 0 --json audit --host || return
  cp out host.json
  check_py "$(json_get host.json 'j["all_denied"] and j["control_read_ok"]')" "not every probe was denied"
  check_py "$(json_get host.json 'sorted(p["probe"] for p in j["probes"]) == sorted(["tcp", "udp", "read", "shadow", "write", "environ", "ptrace", "unshare", "fork", "pids", "exec", "memory"])')" \
    "the probes are not the twelve expected: $(json_get host.json '[p["probe"] for p in j["probes"]]')"
  check_py "$(json_get host.json 'set(["socket", "execve", "ptrace", "unshare", "clone"]) <= set(j["logged_denials"])')" \
    "the denied system calls were not logged by name: $(json_get host.json 'j["logged_denials"]')"
  check_py "$(json_get host.json 'j["sandbox"]["missing"] == [] and j["sandbox"]["seccomp"] and j["sandbox"]["landlock_abi"] >= 1')" \
    "a layer is missing: $(json_get host.json 'j["sandbox"]')"
  check_py "$(json_get host.json '"torch" in [b["name"] for b in j["backends"]]')" "the torch backend did not load inside the sandbox"
  fedl_expect 0 audit --host || return
  expect_in out "all 12 forbidden actions were denied"
  fedl_expect 2 audit --host ws
  expect_in err "--host audits this host's sandbox"
}

# strict refuses to run where a layer is missing (here: cgroups, which an ordinary user may not
# write to unless the host delegates them); auto goes on and says which layer is off; off says so.
test_strict_refuses_a_missing_layer_and_auto_names_it()
{
  "$FEDL" -q init ws --clients 1 --arch mlp:8 --partition "$DATA/iris.csv" --no-header --split iid --seed 1 \
    --listen 127.0.0.1:1 >init.log 2>&1 || { fail "fedl init failed"; cat init.log; return; }
  # Readable and writable by nobody, whom the first two runs are.
  cp ws/clients/site-1/data/train.csv data.csv
  mkdir -m 777 outputs
  local train=(train --data data.csv --no-header --arch mlp:8 --out outputs/u.st)
  # (A sanitizer build's log_path is root's: nobody's reports go to stderr, which the sanitizer
  # run searches too.)
  local nobody=(env -u ASAN_OPTIONS -u TSAN_OPTIONS -u UBSAN_OPTIONS setpriv --reuid 65534 --regid 65534
    --clear-groups)
  "${nobody[@]}" "$FEDL" "${train[@]}" --memory-limit 256M --sandbox strict >out 2>err
  [[ $? == 1 ]] || fail "--sandbox strict without cgroups did not exit 1"
  expect_in err "--sandbox strict: cgroup limits: cannot make the cgroup"
  expect_no_file outputs/u.st
  "${nobody[@]}" "$FEDL" "${train[@]}" --memory-limit 256M >out 2>err || { fail "--sandbox auto without cgroups failed"; cat err; }
  # The floor without cgroups (not in a sanitizer build, which make asan and make tsan run).
  [[ -z ${ASAN_OPTIONS:-}${TSAN_OPTIONS:-} ]] && expect_in err "rlimit data 1.2 GiB"
  expect_in err "(not enforced: cgroup limits"
  expect_in out "update: outputs/u.st"
  fedl_expect 0 "${train[@]}" --sandbox off
  expect_in err "sandbox off: fedl train runs with all of this user's access"
  fedl_expect 2 "${train[@]}" --sandbox maybe
  fedl_expect 2 "${train[@]}" --memory-limit 1K
  expect_in err "--memory-limit 1K: give a size of at least 16M"
  fedl_expect 2 "${train[@]}" --cpu-limit 0
  fedl_expect 2 "${train[@]}" --pids-limit 2
}

# Each update says how its site confined its trainer and the ledger records it per site; serve
# --require-sandbox strict refuses the updates of a site that ran auto (the site is dropped from
# each round, and says why in no update of its own), while the strict sites' rounds complete.
test_serve_requires_a_strict_sandbox_and_the_ledger_records_each_sites()
{
  trap net_cleanup EXIT
  net_init 3 3 || return
  fedl_expect 2 serve ws --require-sandbox maybe
  serve_bg --min-clients 2 --require-sandbox strict --round-timeout 20 --heartbeat 1
  join_bg site-1 --sandbox strict
  join_bg site-2 --sandbox strict
  join_bg site-3
  expect_exit "$SERVE" 120 0 "fedl serve"
  local k
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 3
  expect_ledger "all(sites(b) == ['site-1', 'site-2'] for b in R)" "the participants are not the two strict sites"
  expect_ledger "all(b['site_metrics'][s]['sandbox'] == 'strict' for b in R for s in ('site-1', 'site-2'))" \
    "the ledger does not record each site's sandbox"
  expect_ledger "all(any(d['site'] == 'site-3' and 'requires --sandbox strict' in d['reason'] for d in b['dropped']) for b in R)" \
    "site-3's refused updates are not recorded as dropped with why"
  expect_ledger "[e['body']['require_sandbox'] for e in L if e['kind'] == 'serve'] == ['strict']" \
    "the serve entry does not record --require-sandbox"
  expect_in serve.log "update from site-3 refused: its trainer ran with --sandbox auto"
}
