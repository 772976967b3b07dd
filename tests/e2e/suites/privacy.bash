# SPDX-License-Identifier: Apache-2.0
# fedl audit --privacy-calc: the DP-SGD accountants from the command line: RDP checked against TF
# Privacy's published vectors and an independent mpmath computation (rdp_reference.py), PLD (the
# default) against published values and an independent numpy computation's brackets
# (tests/tools/pld_reference.py, too slow to run here).

test_tf_privacy_vector_json()
{
  # TF Privacy 0.9.0 compute_dp_sgd_privacy_test.py: n 60000, batch 150, sigma 1.3, 15 epochs.
  fedl_expect 0 --json audit --privacy-calc --sample-rate 0.0025 --noise-multiplier 1.3 --steps 6000 \
    --delta 1e-5 --accountant rdp || return
  [[ $(json_get out "sorted(j.keys())") == "['accountant', 'delta', 'epsilon', 'noise_multiplier', 'order', 'sample_rate', 'schema', 'steps']" ]] ||
    fail "keys: $(cat out)"
  # The fine order grid (rdp-v2) finds the same best order as TF Privacy's list here.
  check_py "abs($(json_get out "j['epsilon']") - 0.7242234026109595) <= 1e-3 * 0.7242234026109595" \
    "epsilon $(json_get out "j['epsilon']"), expected 0.7242234026109595"
  [[ $(json_get out "(j['order'], j['steps'], j['delta'])") == "(19.0, 6000, 1e-05)" ]] || fail "fields: $(cat out)"
}

test_text_output()
{
  fedl_expect 0 audit --privacy-calc --sample-rate 0.0025 --noise-multiplier 1.3 --steps 6000 --delta 1e-5 \
    --accountant rdp || return
  expect_in out "epsilon 0.7242 (delta 1e-05, RDP, best order 19) for 6000 steps at sample rate 0.0025, noise multiplier 1.3"
  fedl_expect 0 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1.1 --steps 1000 --delta 1e-5 || return
  expect_in out "epsilon 1.5154 (delta 1e-05, PLD; the exact value is at least 1.49"
}

test_delta_at_an_epsilon()
{
  # The other conversion: delta at the epsilon the first bracket's setting gives for 1e-5.
  fedl_expect 0 --json audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1.1 --steps 1000 --epsilon 1.5154 ||
    return
  check_py "abs($(json_get out "j['delta']") - 1e-5) < 5e-7 and $(json_get out "j['delta_lower']") <= $(json_get out "j['delta']")" \
    "delta: $(cat out)"
  fedl_expect 0 audit --privacy-calc --sample-rate 1 --noise-multiplier 5 --steps 50 --epsilon 6.57297 --accountant rdp ||
    return
  expect_in out "(epsilon 6.57297, RDP) for 50 steps"
}

test_pld_is_the_default_and_within_the_independent_brackets()
{
  # pld_reference.py's brackets (h 1e-6, 2e-7, 1e-5, 2e-6, 2e-6); published PLD/PRV values
  # 1.515 and 2.295 for the first two; the third is the analytic Gaussian's 6.5730.
  local q s t d lo hi
  while read -r q s t d lo hi; do
    fedl_expect 0 --json audit --privacy-calc --sample-rate "$q" --noise-multiplier "$s" --steps "$t" --delta "$d" ||
      continue
    [[ $(json_get out "j['accountant']") == pld-v1 ]] || fail "accountant: $(cat out)"
    check_py "$lo <= $(json_get out "j['epsilon']") <= $hi * 1.001 and $(json_get out "j['epsilon_lower']") <= $hi" \
      "q $q sigma $s steps $t delta $d: $(cat out), reference [$lo, $hi]"
  done <<'END'
0.01 1.1 1000 1e-5 1.514860 1.515863
0.004 1.1 15000 1e-5 2.293870 2.296873
1 5 50 1e-5 6.572718 6.573226
0.1 0.8 100 1e-6 12.525230 12.525447
0.02 2.0 500 1e-5 0.920422 0.921424
END
}

test_agrees_with_mpmath_reference()
{
  # A spread of rates, noise and steps, including cases whose best order is fractional.
  local q s t d want got
  while read -r q s t d; do
    fedl_expect 0 --json audit --privacy-calc --sample-rate "$q" --noise-multiplier "$s" --steps "$t" --delta "$d" \
      --accountant rdp || continue
    want=$("$PY" "$FEDL_SOURCE_DIR/tests/e2e/rdp_reference.py" "$q" "$s" "$t" "$d") || { fail "reference failed"; continue; }
    got=$(cat out)
    check_py "abs(${got}['epsilon'] - ${want}['epsilon']) <= 1e-6 * ${want}['epsilon'] and ${got}['order'] == ${want}['order']" \
      "q $q sigma $s steps $t delta $d: fedl $got, reference $want"
  done <<'END'
0.01 1.1 1000 1e-5
0.1 0.8 100 1e-5
0.004 0.6 5000 1e-6
0.02 2.0 20000 1e-5
0.5 0.7 10 1e-3
0.001 5.0 100000 1e-8
1 1.3 10 1e-5
END
}

test_bad_input_exits_2()
{
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 0 --steps 10 --delta 1e-5
  expect_in err "--noise-multiplier 0: must be > 0"
  fedl_expect 2 audit --privacy-calc --sample-rate 2 --noise-multiplier 1 --steps 10 --delta 1e-5
  expect_in err "--sample-rate 2: must be in (0, 1]"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 0 --delta 1e-5
  expect_in err "--steps 0: must be at least 1"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 10 --delta 1
  expect_in err "--delta 1: must be in (0, 1)"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --steps 10
  expect_in err "--privacy-calc needs --noise-multiplier, --delta"
  fedl_expect 2 audit --sample-rate 0.01
  expect_in err "--sample-rate is only for --privacy-calc"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 10 --delta 1e-5 ws
  expect_in err "--privacy-calc takes no workspace"
  fedl_expect 2 audit
  expect_in err "needs a workspace folder WS"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 10 --delta 1e-5 --accountant prv
  expect_in err "--accountant: prv not in {pld,rdp}"
  fedl_expect 2 audit ws --accountant rdp
  expect_in err "--accountant is only for --privacy-calc"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 10 --delta 1e-5 --epsilon 1
  expect_in err "--delta and --epsilon are the two ways to ask"
  fedl_expect 2 audit --privacy-calc --sample-rate 0.01 --noise-multiplier 1 --steps 10 --epsilon -1
  expect_in err "--epsilon -1: must be a finite number >= 0"
}
