# SPDX-License-Identifier: Apache-2.0
# The command-line contract: help, version, unknown commands, global options, exit codes.

iris_model()
{
  "$FEDL" -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 5 --lr 0.05 --save-model iris.st
}

test_help_lists_only_working_commands()
{
  fedl_expect 0 --help || return
  for c in init serve join train eval aggregate audit completion; do expect_in out "  $c "; done
  for c in __doc __worker; do expect_not_in out "  $c "; done
  fedl_expect 0 train --help && expect_in out "--prox-mu"
}

test_version_lists_backend_and_devices()
{
  fedl_expect 0 --version || return
  expect_in out "fedl 0."
  expect_in out "LibTorch 1."
  expect_in out "devices: "
  expect_in out "cpu"
  fedl_expect 0 --json --version || return
  [[ $(json_get out "'cpu' in j['backends'][0]['devices']") == True ]] || fail "--json --version lists no cpu device"
}

test_binary_does_not_link_libtorch()
{
  if ldd "$FEDL" | grep -q -i torch; then
    fail "the fedl binary links LibTorch: $(ldd "$FEDL" | grep -i torch)"
  fi
}

test_unknown_command_suggests()
{
  fedl_expect 2 trian --data x || return
  expect_in err "did you mean 'train'?"
  fedl_expect 2 frobnicate
  expect_in err "'frobnicate' is not a fedl command"
}

test_usage_errors_exit_2()
{
  fedl_expect 2 train --bogus-flag
  fedl_expect 2 train --data x.csv --epochs minus
  fedl_expect 2 --log-format xml train --help
  fedl_expect 2 train --data "$DATA/iris.csv" --no-header --arch logreg --model m.st --save-model x.st
  fedl_expect 2
  # A misspelt option is named, not taken for a missing one ("--data is required").
  fedl_expect 2 train --dat x.csv --arch logreg --save-model x.st || return
  expect_in err "unknown option or argument: --dat x.csv"
  expect_not_in err "is required"
  # Options that conflict are refused before the data loads.
  fedl_expect 2 train --data "$DATA/iris.csv" --no-header --torchscript m.pt --arch logreg --save-model x.st || return
  expect_in err "--torchscript and --arch both name the model"
  expect_not_in err "samples of shape"
  fedl_expect 2 eval --data "$DATA/iris.csv" --no-header --model m.st --arch logreg || return
  expect_not_in err "samples of shape"
}

test_version_after_a_command_prints_the_version()
{
  fedl_expect 0 --version || return
  cp out top.txt
  fedl_expect 0 train --version || return
  cmp -s out top.txt || fail "fedl train --version printed something else than fedl --version: $(cat out err)"
}

test_global_options_before_or_after_the_command()
{
  iris_model || { fail "training failed"; return; }
  fedl_expect 0 --json eval --model iris.st --data "$DATA/iris.csv" --no-header || return
  mv out before.json
  fedl_expect 0 eval --model iris.st --data "$DATA/iris.csv" --no-header --json || return
  cmp -s before.json out || fail "--json before and after the command differ"
  [[ $(json_get out "sorted(j.keys())") == "['accuracy', 'loss', 'samples', 'schema']" ]] || fail "eval --json keys: $(cat out)"
}

test_quiet_and_json_logs()
{
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 2 --save-model a.st || return
  [[ -s err ]] && fail "-q still printed on stderr: $(cat err)"
  fedl_expect 0 train --log-format json --data "$DATA/iris.csv" --no-header --arch logreg --epochs 2 --save-model b.st || return
  "$PY" -c '
import json, sys
lines = open("err").read().splitlines()
assert lines, "no log lines"
for l in lines:
    j = json.loads(l)
    assert {"time", "level", "msg"} <= j.keys(), l
' || fail "--log-format json wrote a line that is not a JSON log record"
}

test_absent_device_is_exit_2()
{
  if "$FEDL" --version | grep -q cuda; then
    fedl_expect 2 train --data "$DATA/iris.csv" --no-header --arch logreg --device npu:7 --save-model x.st
  else
    fedl_expect 2 train --data "$DATA/iris.csv" --no-header --arch logreg --device cuda --save-model x.st || return
    expect_in err "device 'cuda' is not available"
    expect_in err "present: cpu"
  fi
  expect_no_file x.st
}

test_missing_backend_is_a_clear_error()
{
  mkdir -p alone && cp "$FEDL" alone/fedl
  FEDL_BACKEND_PATH= alone/fedl train --data "$DATA/iris.csv" --no-header --arch logreg --save-model x.st >out 2>err
  [[ $? == 1 ]] || fail "expected exit 1 without a backend"
  expect_in err "no compute backend could be loaded"
  expect_in err "libfedl-backend-torch.so"
  alone/fedl --help >/dev/null || fail "--help needs no backend"
}

test_completion_scripts_load()
{
  fedl_expect 0 completion bash || return
  bash -n out || fail "bash completion has syntax errors"
  fedl_expect 0 completion fish && expect_in out "complete -c fedl"
  fedl_expect 0 completion zsh && expect_in out "#compdef fedl"
  fedl_expect 2 completion tcsh
}

test_every_json_document_says_its_schema()
{
  schema_of() { json_get out "j.get('schema')"; }
  fedl_expect 0 --json train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 1 --save-model m.st || return
  [[ $(schema_of) == 1 ]] || fail "train --json: $(cat out)"
  fedl_expect 0 --json eval --data "$DATA/iris.csv" --no-header --model m.st || return
  [[ $(schema_of) == 1 ]] || fail "eval --json: $(cat out)"
  fedl_expect 0 --json inspect m.st || return
  [[ $(schema_of) == 1 ]] || fail "inspect --json: $(cat out)"
  fedl_expect 0 --json init ws --clients 2 --arch logreg --input-dim 4 --classes 3 --listen 127.0.0.1:1 || return
  [[ $(schema_of) == 1 ]] || fail "init --json: $(cat out)"
  [[ $(json_get out "j['model'], j['model_sha256']") == \
    "('models/global-000000.safetensors', '$(sha256sum ws/models/global-000000.safetensors | cut -d' ' -f1)')" ]] ||
    fail "init --json model: $(cat out)"
  fedl_expect 0 --json audit ws || return
  [[ $(schema_of) == 1 ]] || fail "audit --json: $(cat out)"
  fedl_expect 0 --json audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1.1 --steps 100 --delta 1e-5 || return
  [[ $(schema_of) == 1 ]] || fail "audit --privacy-calc --json: $(cat out)"
}
