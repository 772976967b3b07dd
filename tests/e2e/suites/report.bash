# SPDX-License-Identifier: Apache-2.0
# fedl report: one self-contained HTML page of a federation's verified history, checked in a real
# headless browser (Debian's chromium): it renders (a screenshot that is not blank), each chart
# has a point or bar per round and series, nothing is fetched and no script runs (no console
# message), and a ledger that fails the audit gets a page that says so and shows none of it.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

suite_probe()
{
  command -v chromium >/dev/null || { echo "chromium is not installed (scripts/setup-debian.sh installs it)"; return 1; }
}

# browse PAGE NAME: chromium renders PAGE: its DOM in NAME.dom, a 1000x2400 screenshot in
# NAME.png, its log (console messages included) in NAME.log.
browse()
{
  local url="file://$PWD/$1"
  local flags=(--headless --no-sandbox --disable-gpu --no-first-run --user-data-dir="$PWD/chromium-$2"
    --enable-logging=stderr --v=0 --window-size=1000,2400)
  timeout 120 chromium "${flags[@]}" --dump-dom "$url" >"$2.dom" 2>"$2.log" || { fail "chromium --dump-dom $1"; cat "$2.log"; }
  timeout 120 chromium "${flags[@]}" --screenshot="$PWD/$2.png" "$url" >/dev/null 2>>"$2.log" ||
    { fail "chromium --screenshot $1"; cat "$2.log"; }
}

# console_messages NAME: the console lines chromium logged for the page.
console_messages()
{
  grep -F ':CONSOLE' "$1.log"
}

# dom_check NAME EXPR MESSAGE: a Python expression over the rendered DOM is true. In it, E is the
# list of elements as (tag, attributes, ids of the enclosing elements), and
# count(chart, tag, cls) counts the elements of `tag` and class `cls` inside #chart.
dom_check()
{
  "$PY" - "$1.dom" "$2" <<'PY' || fail "page: $3"
import sys
from html.parser import HTMLParser
E, stack = [], []
VOID = {"meta", "br", "img", "input", "link", "hr"}
class P(HTMLParser):
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        E.append((tag, a, [s.get("id") for s in stack if s.get("id")]))
        if tag not in VOID:
            stack.append(a)
    def handle_startendtag(self, tag, attrs):
        E.append((tag, dict(attrs), [s.get("id") for s in stack if s.get("id")]))
    def handle_endtag(self, tag):
        if tag not in VOID and stack:
            stack.pop()
P().feed(open(sys.argv[1]).read())
def count(chart, tag, cls=None, **data):
    return sum(1 for t, a, ids in E if t == tag and chart in ids and (cls is None or a.get("class") == cls)
               and all(a.get("data-" + k) == v for k, v in data.items()))
ok = eval(sys.argv[2])
if not ok:
    print("not true:", sys.argv[2], file=sys.stderr)
sys.exit(0 if ok else 1)
PY
}

# png_ink FILE: "WIDTH HEIGHT INK" of an 8-bit RGB(A) PNG, INK the share of its pixels that are
# not white, in per mille (decoded here: zlib and the five PNG filters, RFC 2083).
png_ink()
{
  "$PY" - "$1" <<'PY'
import struct, sys, zlib
d = open(sys.argv[1], "rb").read()
assert d[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, head = 8, b"", None
while pos < len(d):
    n, kind = struct.unpack(">I4s", d[pos:pos + 8])
    body = d[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        head = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
w, h, depth, colour, _, _, interlace = head
assert depth == 8 and colour in (2, 6) and interlace == 0, head
bpp = 3 if colour == 2 else 4
raw, stride, prev, ink = zlib.decompress(idat), w * bpp, bytearray(w * bpp), 0
for y in range(h):
    f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        if f == 1: line[i] = (line[i] + a) & 255
        elif f == 2: line[i] = (line[i] + b) & 255
        elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    ink += sum(1 for x in range(0, stride, bpp) if line[x:x + 3] != b"\xff\xff\xff")
    prev = line
print(w, h, ink * 1000 // (w * h))
PY
}

test_the_report_of_a_federation_renders_every_round_in_a_real_browser()
{
  trap net_cleanup EXIT
  # Three sites with DP-SGD (so each round records each site's epsilon), four rounds.
  net_init 3 4 --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0 || return
  serve_bg --min-clients 3
  join_bg site-1
  join_bg site-2
  join_bg site-3
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_rounds 4
  fedl_expect 0 --json report ws -o report.html || return
  check_py "$(json_get out "j['verified'] and j['rounds'] == 4 and j['report'] == 'report.html' and j['schema'] == 1")" \
    "report --json: $(cat out)"
  # Without -o, into the workspace.
  fedl_expect 0 report ws || return
  expect_in out "wrote ws/report.html: 4 rounds, ledger verified"
  cmp -s <(grep -v 'Written by fedl' ws/report.html) <(grep -v 'Written by fedl' report.html) ||
    fail "the default report differs from -o's"
  # Self-contained: no address of anything outside the page.
  expect_not_in report.html "http:"
  expect_not_in report.html "https:"
  expect_not_in report.html "<script"
  # The best model (serve --best-metric, accuracy by default) in the summary.
  expect_in report.html "best model</td><td>round "

  browse report.html report
  if console_messages report; then fail "console messages while rendering the report"; fi
  dom_check report "any(t == 'p' and a.get('id') == 'verification' and a.get('class') == 'verified ok' for t, a, i in E)" \
    "the verification status"
  # A point per round in the accuracy and loss charts; a line of 4 points per site in epsilon.
  dom_check report "count('chart-accuracy', 'circle', 'point') == 4 and count('chart-loss', 'circle', 'point') == 4" \
    "accuracy and loss points"
  dom_check report "all(count('chart-epsilon', 'circle', 'point', series='site-%d' % k) == 4 for k in (1, 2, 3)) \
    and count('chart-epsilon', 'circle', 'point') == 12 and count('chart-epsilon', 'polyline', 'series') == 3" \
    "epsilon points per site"
  # Participation: three updates a round, nothing rejected, dropped or late; a duration a round.
  dom_check report "count('chart-participation', 'rect', 'bar', series='updates') == 4 \
    and count('chart-participation', 'rect', 'bar') == 4 and count('chart-seconds', 'rect', 'bar') == 4" \
    "participation and duration bars"
  dom_check report "sum(1 for t, a, i in E if t == 'tr' and 'rounds' in i) == 5" "a table row per round"
  # The points sit where the ledger says: the best accuracy is the highest point.
  "$PY" - report.dom ws/ledger.jsonl <<'PY' || fail "the accuracy points do not follow the ledger"
import json, re, sys
dom = open(sys.argv[1]).read()
acc = [json.loads(l)["body"]["evaluation"]["accuracy"] for l in open(sys.argv[2]) if '"kind":"round"' in l]
cy = {int(r): float(y) for r, y in re.findall(r'data-series="accuracy" data-round="(\d+)" cx="[\d.]+" cy="([\d.]+)"', dom)}
assert sorted(cy) == [1, 2, 3, 4], cy
best = max(range(4), key=lambda k: acc[k]) + 1
assert min(cy, key=cy.get) == best, (cy, acc)
PY
  # It rendered: a screenshot of the window's size with ink on it (an empty page has none).
  local shot blank
  shot=$(png_ink report.png) || fail "cannot read report.png"
  echo '<!DOCTYPE html><html><body></body></html>' >blank.html
  browse blank.html blank
  blank=$(png_ink blank.png) || fail "cannot read blank.png"
  echo "screenshot (width, height, non-white per mille): $shot; an empty page: $blank"
  [[ $blank == "1000 2400 0" ]] || fail "an empty page is not white: $blank"
  [[ $shot =~ ^1000\ 2400\ ([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 20)) ||
    fail "the screenshot looks blank: $shot"

  # The console check can fail: a page with a script (which the page's policy refuses) logs.
  sed 's|</body>|<script>undefined_function()</script></body>|' report.html >scripted.html
  browse scripted.html scripted
  console_messages scripted >/dev/null || fail "chromium logged no console message for a refused script"
}

test_a_ledger_that_does_not_verify_gets_a_page_that_says_so_and_shows_nothing()
{
  "$FEDL" -q init ws --clients 2 --arch mlp:16 --partition "$DATA/iris.csv" --no-header --split iid --holdout 0.2 \
    --rounds 1 --seed 1 >init.log 2>&1 || { fail "fedl init"; cat init.log; return; }
  fedl_expect 0 report ws -o empty.html || return
  expect_in out "0 rounds, ledger verified"
  expect_in empty.html 'id="chart-accuracy">No round recorded'
  # A byte of the genesis entry changed: the signature no longer matches.
  sed -i '1s/"rounds":1/"rounds":2/' ws/ledger.jsonl
  fedl_expect 3 report ws -o broken.html || return
  expect_in out "the ledger does not verify"
  expect_in broken.html "The ledger does not verify"
  expect_not_in broken.html "<svg"
  expect_not_in broken.html 'id="rounds"'
  fedl_expect 3 --json report ws -o broken.html || return
  check_py "$(json_get out "not j['verified'] and j['rounds'] == 0 and 'ledger' in j['error']")" "json: $(cat out)"
  browse broken.html broken
  if console_messages broken; then fail "console messages on the failure page"; fi
  dom_check broken "any(a.get('class') == 'verified failed' for t, a, i in E)" "the failure is shown"
  # Bad usage: no workspace; an output that cannot be written.
  fedl_expect 2 report nowhere || return
  fedl_expect 1 report ws -o no/such/folder/r.html || return
  expect_in err "no/such/folder/r.html"
}
