#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Keep fedl's man pages in step with its command line, and lint-clean.

usage: check_manpages.py FEDL_BINARY MAN_DIR

Reads the command-line definition from `FEDL_BINARY __doc` (JSON: a list of
commands; the one named "" holds the global options) and checks MAN_DIR:

  - every visible command CMD has a page fedl-CMD.1, and every fedl-*.1 page
    belongs to a command;
  - a command page has the sections NAME, SYNOPSIS, DESCRIPTION, OPTIONS,
    EXIT STATUS, EXAMPLES and SEE ALSO;
  - each option of a command (long form, and short form if any) has an entry
    (.TP/.TQ/.IP tag) in its page's OPTIONS section;
  - OPTIONS mentions no --flag that the command lacks (global options may be
    mentioned anywhere);
  - fedl.1 has an entry for every global option and names every command page;
  - `mandoc -T lint -W warning` prints nothing for any *.1 or *.5 page.

Options may be written as roff escapes (\\-\\-name, \\fB...\\fR) or plainly.
Exit status: 0 when every check passes, 1 otherwise (each failure says what to
fix), 2 for bad usage.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

COMMAND_SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]
ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
LONG_RE = re.compile(r"(?<![A-Za-z0-9_-])--([A-Za-z0-9][A-Za-z0-9_-]*)")
SHORT_RE = re.compile(r"(?<![A-Za-z0-9_-])-([A-Za-z0-9])(?![A-Za-z0-9_-])")
SPECIAL_CHARS = {"hy": "-", "mi": "-", "en": "-", "em": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"'}


class Checker:
    def __init__(self, man_dir):
        self.man_dir = man_dir
        self.label = os.path.basename(os.path.normpath(man_dir)) or man_dir
        self.failures = []
        self.passed = 0

    def where(self, name):
        return f"{self.label}/{name}"

    def ok(self, message):
        self.passed += 1
        print(f"ok: {message}")

    def fail(self, message):
        self.failures.append(message)
        print(f"FAIL: {message}", file=sys.stderr)

    def check(self, condition, ok_message, fail_message):
        if condition:
            self.ok(ok_message)
        else:
            self.fail(fail_message)
        return condition


def unescape(text):
    """Roff text to plain text: dashes, fonts and zero-width escapes resolved."""
    text = re.sub(r'\\".*', "", text)  # comment
    text = re.sub(r"\\\((..)", lambda m: SPECIAL_CHARS.get(m.group(1), ""), text)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: SPECIAL_CHARS.get(m.group(1), ""), text)
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)  # font changes
    text = text.replace("\\-", "-").replace("\\e", "\\")
    text = re.sub(r"\\[&|^%c:/,)]", "", text)
    text = text.replace("\\ ", " ").replace("\\~", " ")
    return text


def macro_args(rest):
    """The arguments of a macro line, with roff's double-quote rules."""
    args, cur, quoted, i, started = [], "", False, 0, False
    while i < len(rest):
        ch = rest[i]
        if quoted:
            if ch == '"' and i + 1 < len(rest) and rest[i + 1] == '"':
                cur += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                cur += ch
        elif ch == '"' and not started:
            quoted, started = True, True
        elif ch in " \t":
            if started:
                args.append(cur)
                cur, started = "", False
        else:
            cur += ch
            started = True
        i += 1
    if started:
        args.append(cur)
    return args


def line_text(line):
    """The text a roff line contributes (macro arguments joined as the macro would)."""
    if line.startswith((".", "'")):
        m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
        if not m:
            return ""
        name, rest = m.group(1), m.group(2)
        if name.startswith('\\"'):
            return ""
        args = macro_args(rest)
        joined = "".join(args) if name in ALTERNATING else " ".join(args)
        return unescape(joined)
    return unescape(line)


def read_page(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def sections(lines):
    """{section title: [lines]} for each .SH of a man(7) page."""
    out, current = {}, None
    for line in lines:
        m = re.match(r"\.SH\s+(.*)", line)
        if m:
            current = " ".join(macro_args(m.group(1))).strip().upper()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def tags(lines):
    """The plain text of every item tag (.TP/.TQ next line, .IP argument)."""
    out = []
    expect_tag = False
    for line in lines:
        if line.startswith('.\\"') or re.match(r"\.PD\b", line):
            continue
        if re.match(r"\.(TP|TQ)\b", line):
            expect_tag = True
            continue
        if expect_tag:
            out.append(line_text(line))
            expect_tag = False
            continue
        m = re.match(r"\.IP\s+(.*)", line)
        if m:
            args = macro_args(m.group(1))
            if args:
                out.append(unescape(args[0]))
    return out


def flags_in(texts):
    longs, shorts = set(), set()
    for t in texts:
        longs.update("--" + m for m in LONG_RE.findall(t))
        shorts.update("-" + m for m in SHORT_RE.findall(t))
    return longs, shorts


def option_names(option):
    return ["--" + n for n in option.get("long", [])] + ["-" + n for n in option.get("short", [])]


def check_options(ck, page, who, options, allowed_longs, opt_lines):
    """Every option has an entry in OPTIONS; OPTIONS names no foreign --flag."""
    tag_longs, tag_shorts = flags_in(tags(opt_lines))
    all_longs, all_shorts = flags_in(line_text(l) for l in opt_lines)
    for option in options:
        for name in option_names(option):
            in_tags = name in tag_longs or name in tag_shorts
            mentioned = name in all_longs or name in all_shorts
            if in_tags:
                ck.ok(f"{page} documents {name}")
            elif mentioned:
                ck.fail(f"{page} mentions {name} but has no entry for it: add a .TP item for {name} "
                        f"to OPTIONS ({who}: {option.get('help', '')})")
            else:
                ck.fail(f"{page} does not document {name}: add it to OPTIONS ({who}: {option.get('help', '')})")
    for name in sorted(all_longs - allowed_longs):
        ck.fail(f"{page} mentions {name} in OPTIONS, but {who} has no such option: remove it or fix its name")


def run_doc(binary):
    try:
        proc = subprocess.run([binary, "__doc"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        sys.exit(f"check_manpages: cannot run {binary} __doc: {e}")
    except subprocess.TimeoutExpired:
        sys.exit(f"check_manpages: {binary} __doc did not finish within 120 s")
    if proc.returncode != 0:
        sys.exit(f"check_manpages: {binary} __doc exited {proc.returncode}: {proc.stderr.strip()}")
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        sys.exit(f"check_manpages: {binary} __doc did not print JSON ({e})")
    if not isinstance(doc, list) or not doc or not all(isinstance(c, dict) and "name" in c for c in doc):
        sys.exit(f"check_manpages: {binary} __doc printed JSON of an unexpected shape (want a list of commands)")
    return doc


def lint(ck, man_dir):
    pages = sorted(glob.glob(os.path.join(man_dir, "*.[1-9]")))
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        ck.fail("mandoc is not installed, so the pages cannot be linted: install it (apt-get install mandoc)")
        return
    for path in pages:
        page = ck.where(os.path.basename(path))
        proc = subprocess.run([mandoc, "-T", "lint", "-W", "warning", path], capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 and not out:
            ck.ok(f"{page} passes mandoc -T lint -W warning")
        else:
            ck.fail(f"{page} fails mandoc -T lint -W warning (exit {proc.returncode}); fix these:\n  "
                    + "\n  ".join(out.splitlines()))


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    binary, man_dir = argv[1], argv[2]
    if not os.path.isdir(man_dir):
        print(f"check_manpages: {man_dir} is not a folder", file=sys.stderr)
        return 2
    doc = run_doc(binary)
    ck = Checker(man_dir)

    root = next((c for c in doc if c["name"] == ""), {"options": []})
    commands = [c for c in doc if c["name"] and not c["name"].startswith("_") and not c.get("hidden")]
    global_longs = {n for o in root.get("options", []) for n in option_names(o) if n.startswith("--")}

    # Pages and commands, both ways.
    page_names = {os.path.basename(p)[len("fedl-"):-len(".1")]
                  for p in glob.glob(os.path.join(man_dir, "fedl-*.1"))}
    for c in commands:
        ck.check(c["name"] in page_names, f"fedl {c['name']} has {ck.where('fedl-' + c['name'] + '.1')}",
                 f"{ck.where('fedl-' + c['name'] + '.1')} is missing: write the page of fedl {c['name']} "
                 f"(sections {', '.join(COMMAND_SECTIONS)})")
    for name in sorted(page_names - {c["name"] for c in commands}):
        ck.fail(f"{ck.where('fedl-' + name + '.1')} documents 'fedl {name}', which is not a command: "
                f"remove the page or rename it after an existing command")

    # The overview page: global options and the list of commands.
    main_path = os.path.join(man_dir, "fedl.1")
    if ck.check(os.path.isfile(main_path), f"{ck.where('fedl.1')} exists",
                f"{ck.where('fedl.1')} is missing: write the overview page with the global options"):
        lines = read_page(main_path)
        secs = sections(lines)
        if ck.check("OPTIONS" in secs, f"{ck.where('fedl.1')} has OPTIONS",
                    f"{ck.where('fedl.1')} has no OPTIONS section: add one for the global options"):
            check_options(ck, ck.where("fedl.1"), "fedl (global options)", root.get("options", []),
                          global_longs, secs["OPTIONS"])
        text = "\n".join(line_text(l) for l in lines)
        for c in commands:
            ck.check(f"fedl-{c['name']}" in text, f"{ck.where('fedl.1')} names fedl-{c['name']}(1)",
                     f"{ck.where('fedl.1')} does not name fedl-{c['name']}(1): add it to COMMANDS and SEE ALSO")

    # Each command's page.
    for c in commands:
        if c["name"] not in page_names:
            continue
        fname = f"fedl-{c['name']}.1"
        page = ck.where(fname)
        lines = read_page(os.path.join(man_dir, fname))
        secs = sections(lines)
        missing = [s for s in COMMAND_SECTIONS if s not in secs]
        ck.check(not missing, f"{page} has sections {', '.join(COMMAND_SECTIONS)}",
                 f"{page} lacks section(s) {', '.join(missing)}: add them")
        if "NAME" in secs:
            name_text = " ".join(line_text(l) for l in secs["NAME"])
            ck.check(name_text.strip().startswith(f"fedl-{c['name']} "), f"{page} NAME is fedl-{c['name']}",
                     f"{page}: NAME must start with 'fedl\\-{c['name']} \\- ' (found '{name_text.strip()}')")
        if "OPTIONS" in secs:
            allowed = {"--" + n for o in c.get("options", []) for n in o.get("long", [])} | global_longs
            check_options(ck, page, f"fedl {c['name']}", c.get("options", []), allowed, secs["OPTIONS"])

    lint(ck, man_dir)

    if ck.failures:
        print(f"check_manpages: {len(ck.failures)} problem(s), {ck.passed} check(s) passed", file=sys.stderr)
        return 1
    print(f"check_manpages: all {ck.passed} checks passed ({len(commands)} commands)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
