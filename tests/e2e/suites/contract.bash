# SPDX-License-Identifier: Apache-2.0
# The data contract (fedl-files(5) fedl.json "data"): fedl init records how the data it partitions
# is laid out, and the coordinator's evaluator and every site read theirs the same way; a site
# whose data does not fit is refused at start, before it connects, and the coordinator checks
# its evaluation data before round 1. A first row of numbers only is never silently a header.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# iris_with_header FILE: the bundled iris (no header row) with one naming its columns.
iris_with_header()
{
  { echo "sepal_length,sepal_width,petal_length,petal_width,species"; cat "$DATA/iris.csv"; } >"$1"
}

# federate_two SITE_ARGS...: serve ws (2 rounds' worth as init set) and two sites joining with
# SITE_ARGS on their shards; both sides must finish cleanly.
federate_two()
{
  "$FEDL" serve ws --threads 1 --min-clients 2 --json >serve.json 2>serve.log &
  SERVE=$!
  BG+=("$SERVE")
  local k
  for k in 1 2; do
    "$FEDL" join "ws/clients/site-$k" --data "ws/clients/site-$k/data/train.csv" --threads 1 --retry-max 1 "$@" \
      >"site-$k.out" 2>"site-$k.log" &
    JOIN[site-$k]=$!
    BG+=("$!")
  done
  expect_exit "$SERVE" 120 0 "fedl serve"
  for k in 1 2; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  [[ $FAILED == 0 ]] || { tail -20 serve.log site-1.log; return 1; }
}

test_a_headerless_holdout_is_evaluated_in_full_and_the_sites_need_no_format_flags()
{
  trap net_cleanup EXIT
  net_init 2 2 || return
  [[ $(json_get ws/fedl.json "j['data']") == "{'format': 'csv', 'header': False}" ]] ||
    fail "fedl.json data: $(json_get ws/fedl.json "j.get('data')")"
  [[ $(json_get ws/clients/site-1/join.json "j['contract']['data']") == "{'format': 'csv', 'header': False}" ]] ||
    fail "join.json contract data: $(json_get ws/clients/site-1/join.json "j['contract'].get('data')")"
  local holdout
  holdout=$(gzip -dc "$DATA/digits.csv.gz" | wc -l)
  holdout=$((holdout - $(wc -l <ws/clients/site-1/data/train.csv) - $(wc -l <ws/clients/site-2/data/train.csv)))
  [[ $(wc -l <ws/data/test.csv) == "$holdout" ]] || fail "the holdout has $(wc -l <ws/data/test.csv) rows, not $holdout"
  # No --no-header at the sites: the contract says the shards have no header row.
  federate_two || return
  # Until the contract, the evaluator took the holdout's first sample for a header.
  expect_in serve.log "on $holdout samples"
  check_py "$(json_get serve.json "j['accuracy']") > 0.5" "accuracy $(cat serve.json)"
}

test_a_label_in_the_first_column_is_evaluated_with_it()
{
  trap net_cleanup EXIT
  PORT=$(free_port) || return
  gzip -dc "$DATA/digits.csv.gz" | awk -F, -v OFS=, '{ l = $NF; NF--; print l, $0 }' >label-first.csv
  "$FEDL" -q init ws --clients 2 --arch mlp:32 --partition label-first.csv --no-header --label-column 0 --split iid \
    --holdout 0.2 --rounds 2 --seed 1 --lr 0.03 --listen "127.0.0.1:$PORT" >init.log 2>&1 ||
    { fail "fedl init failed"; cat init.log; return; }
  [[ $(json_get ws/fedl.json "j['data']") == "{'format': 'csv', 'header': False, 'label_column': '0'}" ]] ||
    fail "fedl.json data: $(json_get ws/fedl.json "j.get('data')")"
  federate_two || return
  # Until the contract, every evaluation failed (the evaluator took the last column for the label)
  # and serve ended with "accuracy": null.
  check_py "$(json_get serve.json "j['accuracy']") > 0.5" "accuracy $(cat serve.json)"
  expect_not_in serve.log "evaluating"
}

test_a_site_whose_columns_differ_is_refused_before_it_connects()
{
  iris_with_header iris.csv
  "$FEDL" -q init ws --clients 2 --arch logreg --partition iris.csv --holdout 0.2 --seed 1 --listen 127.0.0.1:1 \
    >init.log 2>&1 || { fail "fedl init failed"; cat init.log; return; }
  [[ $(json_get ws/fedl.json "j['data']['columns']") == \
    "['sepal_length', 'sepal_width', 'petal_length', 'petal_width', 'species']" ]] ||
    fail "fedl.json data: $(json_get ws/fedl.json "j.get('data')")"
  local shard=ws/clients/site-1/data/train.csv
  # join_refused FILE TEXT [ARGS...]: fedl join on FILE exits 2 within seconds (no coordinator
  # listens on port 1: a site that got past the check would retry), saying TEXT.
  join_refused()
  {
    local file=$1 text=$2
    shift 2
    timeout 20 "$FEDL" join ws/clients/site-1 --data "$file" --retry-for 30 "$@" >out 2>err
    local rc=$?
    [[ $rc == 2 ]] || { fail "join on $file $*: exit $rc, expected 2"; cat err; return; }
    expect_in err "$text"
  }
  awk -F, -v OFS=, '{ t = $1; $1 = $2; $2 = t; print }' "$shard" >swapped.csv
  join_refused swapped.csv "the columns are in another order: column 1 is 'sepal_width' where the federation's data has 'sepal_length'"
  sed '1s/petal_width/petal_w/' "$shard" >renamed.csv
  join_refused renamed.csv "no column 'petal_width', which the federation's data has"
  awk -F, -v OFS=, '{ print $1, $2, $3, $4, $4, $5 }' "$shard" | sed '1s/petal_width,petal_width/petal_width,extra/' \
    >extra.csv
  join_refused extra.csv "column 'extra' is not one of the federation's"
  awk -F, -v OFS=, 'NR == 1 || NR == 2 { print; next } { $5 = 7; print }' "$shard" >label.csv
  join_refused label.csv "label 7, where the federation's model has 3 classes"
  # Flags that contradict the contract.
  join_refused "$shard" "contradicts it" --no-header
  join_refused "$shard" "--label-column 0: the federation's data has its label in the last column" --label-column 0
  # No such file, or a file with the header and no rows: exit 1, as for any unreadable data and as
  # fedl train says it (fedl(1); join said 2 for a missing file).
  timeout 20 "$FEDL" join ws/clients/site-1 --data nowhere.csv --retry-for 30 >out 2>err
  local missing=$?
  [[ $missing == 1 ]] || fail "join on a missing file: exit $missing, expected 1"
  expect_in err "--data nowhere.csv: no such file"
  head -1 "$shard" >empty.csv
  timeout 20 "$FEDL" join ws/clients/site-1 --data empty.csv --retry-for 30 >out 2>err
  local rc=$?
  [[ $rc == 1 ]] || fail "join on a file without rows: exit $rc, expected 1"
  expect_in err "no data rows"
  # A bundle's contract travels signed in join.json: an edited one is refused.
  "$PY" - ws/clients/site-1/join.json <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
j["contract"]["data"]["columns"][0], j["contract"]["data"]["columns"][1] = "sepal_width", "sepal_length"
json.dump(j, open(sys.argv[1], "w"))
PY
  timeout 20 "$FEDL" join ws/clients/site-1 --data swapped.csv --retry-for 30 >out 2>err
  rc=$?
  [[ $rc == 3 ]] || { fail "join with an edited join.json: exit $rc, expected 3"; cat err; }
}

test_serve_checks_its_evaluation_data_before_round_one()
{
  net_init 2 2 || return
  # The iris have 4 features, the digits 64: refused at start, not evaluated in vain each round.
  timeout 30 "$FEDL" serve ws --threads 1 --eval-data "$DATA/iris.csv" >out 2>err
  local rc=$?
  [[ $rc == 2 ]] || { fail "serve with the iris as evaluation data: exit $rc, expected 2"; cat err; }
  expect_in err "iris.csv: samples of shape 4 where the federation's model takes 64"
  # Its own holdout with a flag that contradicts fedl.json.
  timeout 30 "$FEDL" serve ws --threads 1 --header >out 2>err
  rc=$?
  [[ $rc == 2 ]] || { fail "serve --header on a headerless holdout: exit $rc, expected 2"; cat err; }
  expect_in err "the federation's data has no header row"
  timeout 30 "$FEDL" serve ws --threads 1 --eval-data nowhere.csv >out 2>err
  rc=$?
  [[ $rc == 1 ]] || { fail "serve with a missing evaluation file: exit $rc, expected 1"; cat err; }
  expect_no_file ws/models/global-000001.safetensors
}

test_a_first_row_of_numbers_is_not_taken_for_a_header()
{
  # The bundled iris has no header: until now train took its first sample for one, silently.
  fedl_expect 2 train --data "$DATA/iris.csv" --arch logreg --epochs 1 --save-model m.st || return
  expect_in err "line 1 is all numbers, so it may be data rather than a header: give --no-header"
  expect_no_file m.st
  fedl_expect 0 --json train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 1 --save-model m.st || return
  [[ $(json_get out "j['samples']") == 150 ]] || fail "train --no-header: $(cat out)"
  # The times are from the process's start: the first batch, then the training, within the total.
  [[ $(json_get out "j['first_batch_seconds'] <= j['total_seconds'] and j['seconds'] <= j['total_seconds']") == True ]] ||
    fail "train --json times: $(cat out)"
  fedl_expect 0 --json train --data "$DATA/iris.csv" --header --arch logreg --epochs 1 --save-model m.st || return
  [[ $(json_get out "j['samples']") == 149 ]] || fail "train --header: $(cat out)"
  # (and a count of one is singular: it said "1 epochs")
  fedl_expect 0 train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 1 --save-model m.st || return
  expect_in out "trained logreg for 1 epoch on 150 samples"
  fedl_expect 2 train --data "$DATA/iris.csv" --header --no-header --arch logreg --save-model m.st
  fedl_expect 2 eval --model m.st --data "$DATA/iris.csv" || return
  expect_in err "give --no-header if the file has no header row, or --header if this row is one"
  fedl_expect 2 init ws --clients 2 --arch logreg --partition "$DATA/iris.csv" --listen 127.0.0.1:1 || return
  expect_in err "line 1 is all numbers"
  expect_no_file ws
}
