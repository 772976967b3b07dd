#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
# Helpers of tests/soak/soak.sh (the standard library only):
#   sample  DIR      samples the running coordinator from /proc into DIR/samples.csv
#   hostile DIR ...  the hostile site: tests/e2e/fedl_peer.py's `hostile` cases in turn, and now and
#                    then its `strangers`, one report per run in DIR/hostile/
#   rounds  DIR      completed rounds in DIR/ws/ledger.jsonl (a fast count, for the driver)
#   report  DIR ...  checks the ledger, the samples and the hostile reports, reads the verdicts
#                    soak.sh wrote to DIR/events.log, prints the summary (also DIR/summary.json)
#                    and exits 1 if any check failed
# Each loop ends when DIR/stop exists or soak.sh (its parent) is gone.
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "e2e", "fedl_peer.py")
ROUND_TAG = b'"kind":"round",'  # canonical JSON, keys sorted: not "round-failed"


def stopped(run, parent):
    return os.path.exists(os.path.join(run, "stop")) or os.getppid() != parent


class RoundCounter:
    """Counts the ledger's "round" entries, reading only what was appended since the last call."""

    def __init__(self, path):
        self.path, self.offset, self.count = path, 0, 0

    def __call__(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.count
        end = data.rfind(b"\n") + 1  # whole lines only: an entry may be half written
        self.count += data[:end].count(ROUND_TAG)
        self.offset += end
        return self.count


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                fields[key] = int(value.split()[0])
    return fields


# ---- sample
def cmd_sample(a):
    run, parent = a.dir, os.getppid()
    path = os.path.join(run, "samples.csv")
    rounds = RoundCounter(os.path.join(run, "ws", "ledger.jsonl"))
    t0 = float(open(os.path.join(run, "t0")).read())
    with open(path, "a") as out:
        if out.tell() == 0:
            out.write("elapsed,instance,pid,rounds_done,rss_kib,hwm_kib,fds,threads,strangers\n")
        while not stopped(run, parent):
            try:
                instance, pid = open(os.path.join(run, "serve.pid")).read().split()
                st = proc_status(pid)
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, ValueError):
                time.sleep(0.5)  # between two coordinators, or one that just ended
                continue
            strangers = int(os.path.exists(os.path.join(run, "strangers.on")))
            out.write(f"{time.time() - t0:.1f},{instance},{pid},{rounds()},{st.get('VmRSS', 0)},"
                      f"{st.get('VmHWM', 0)},{fds},{st.get('Threads', 0)},{strangers}\n")
            out.flush()
            time.sleep(a.interval)


# ---- rounds
def cmd_rounds(a):
    print(RoundCounter(os.path.join(a.dir, "ws", "ledger.jsonl"))())


# ---- hostile
def cmd_hostile(a):
    sys.path.insert(0, os.path.dirname(PEER))
    import fedl_peer  # the cases the peer knows, so that a new one is cycled through too

    cases = list(fedl_peer.CASES)
    run, parent = a.dir, os.getppid()
    rng = random.Random(a.seed)
    out_dir = os.path.join(run, "hostile")
    os.makedirs(out_dir, exist_ok=True)
    flag = os.path.join(run, "strangers.on")
    n = k = 0
    while not stopped(run, parent):
        n += 1
        if n % a.strangers_every == 0:
            count, hold, sources = rng.randint(4, 24), rng.uniform(1, 4), rng.choice([1, 1, 4])
            name = "strangers"
            cmd = [sys.executable, PEER, "strangers", "--server", a.server, "--ca", a.ca, "--count", str(count),
                   "--hold", f"{hold:.1f}", "--sources", str(sources)]
            open(flag, "w").close()
        else:
            name = cases[k % len(cases)]
            cmd = [sys.executable, PEER, "hostile", "--server", a.server, "--bundle", a.bundle, "--case", name,
                   "--timeout", "20", "--hold", "20"]
            if name == "twice":
                cmd += ["--pause", "0.05"]
        started = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
            rc, text, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text, err = "timeout", e.stdout or "", e.stderr or ""
            text, err = (t.decode() if isinstance(t, bytes) else t for t in (text, err))
        finally:
            if name == "strangers" and os.path.exists(flag):
                os.remove(flag)
        try:
            report = json.loads(text)
        except ValueError:
            report = {"unparsed": text[-2000:]}
        report.update({"run": n, "case": name, "rc": rc, "started": started, "seconds": round(time.time() - started, 2),
                       "stderr": err[-2000:]})
        with open(os.path.join(out_dir, f"{n:05d}-{name}.json"), "w") as f:
            json.dump(report, f, sort_keys=True)
        sent = name == "strangers" or bool(report.get("round"))
        if name != "strangers" and sent:
            k += 1  # the next case only once this one reached the coordinator in a round
        time.sleep(rng.uniform(0.2, 2.0) if sent else 1.0)


# ---- report
def median(xs):
    return statistics.median(xs) if xs else None


def mb(kib):
    return None if kib is None else round(kib / 1024, 1)


def read_samples(run):
    rows = []
    try:
        with open(os.path.join(run, "samples.csv")) as f:
            next(f)
            for line in f:
                v = line.strip().split(",")
                if len(v) != 9:
                    continue
                rows.append({"elapsed": float(v[0]), "instance": int(v[1]), "pid": int(v[2]), "done": int(v[3]),
                             "rss": int(v[4]), "hwm": int(v[5]), "fds": int(v[6]), "threads": int(v[7]),
                             "strangers": v[8] == "1"})
    except (OSError, StopIteration):
        pass
    return rows


def read_events(run):
    events = []
    try:
        for line in open(os.path.join(run, "events.log")):
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) >= 2:
                events.append((float(parts[0]), parts[1], parts[2] if len(parts) > 2 else ""))
    except OSError:
        pass
    return events


def cmd_report(a):
    run = a.dir
    verdicts = []  # (name, ok, detail)

    def verdict(name, ok, detail=""):
        verdicts.append((name, bool(ok), detail))

    events = read_events(run)
    for _, kind, rest in events:
        if kind == "verdict":
            name, status, detail = (rest.split(" ", 2) + ["", ""])[:3]
            verdict(name, status == "ok", detail)

    # -- the ledger
    R, F, serves, finished, hostile_in, hostile_rejected = [], [], [], [], [], 0
    bodies = {}
    try:
        L = [json.loads(line) for line in open(os.path.join(run, "ws", "ledger.jsonl"))]
    except (OSError, ValueError) as e:
        L = []
        verdict("ledger-readable", False, str(e))
    done_before = 0
    resume_ok = True
    resumes = []
    for e in L:
        b = e["body"]
        if e["kind"] == "round":
            R.append(b["round"])
            bodies[b["round"]] = b
            done_before += 1
            if any(p["site"] == a.hostile_site for p in b.get("participants", [])):
                hostile_in.append(b["round"])
            hostile_rejected += sum(r.get("site") == a.hostile_site for r in b.get("rejected", []))
        elif e["kind"] == "round-failed":
            F.append(b.get("round"))
        elif e["kind"] == "serve":
            serves.append(b.get("resume_round"))
            resumes.append((b.get("resume_round"), done_before + 1))
            resume_ok &= b.get("resume_round") == done_before + 1
        elif e["kind"] == "finished":
            finished.append(b.get("round"))
    missing = sorted(set(range(1, a.rounds + 1)) - set(R))
    dups = sorted({r for r in R if R.count(r) > 1})
    extra = sorted({r for r in R if not 1 <= r <= a.rounds})
    ok = R == list(range(1, a.rounds + 1))
    verdict("ledger-rounds", ok, f"{len(R)} round entries; missing {missing[:20]}, duplicated {dups[:20]}, "
            f"out of range {extra[:20]}, in order: {R == sorted(R)}")
    verdict("ledger-resume", resume_ok and len(serves) >= 1,
            f"{len(serves)} serve entries, resume_round vs rounds done + 1: {resumes}")
    verdict("ledger-finished", finished == [a.rounds], f"finished entries: {finished}")

    # -- hostile reports, and what the ledger made of each case
    per_case, strangers_runs, strangers_opened, peer_errors = {}, 0, 0, 0
    latest = {}  # round -> the last report that answered a task of that round
    hdir = os.path.join(run, "hostile")
    for name in sorted(os.listdir(hdir)) if os.path.isdir(hdir) else []:
        try:
            r = json.load(open(os.path.join(hdir, name)))
        except (OSError, ValueError):
            continue
        if r.get("rc") not in (0,):
            peer_errors += 1
        if r.get("case") == "strangers":
            strangers_runs += 1
            strangers_opened += r.get("opened", 0)
        elif r.get("round"):
            per_case[r["case"]] = per_case.get(r["case"], 0) + 1
            latest[r["round"]] = r
    # The round's entry shows the answer of the last peer run that got its task (a coordinator
    # restarted in between asks the round again): an update case rejected, the error report
    # dropped, the deep metrics cut off with the connection, the first of two valid updates taken.
    checked, wrong = 0, []
    for rd, r in sorted(latest.items()):
        b = bodies.get(rd)
        if b is None:
            continue
        h = a.hostile_site
        took = any(p["site"] == h for p in b.get("participants", []))
        rejected = any(x.get("site") == h for x in b.get("rejected", []))
        dropped = any(x.get("site") == h for x in b.get("dropped", []))
        case = r["case"]
        if case == "twice":
            ok = took
        elif case == "error-text":
            ok = dropped and not took
        elif case == "deep-metrics":
            ok = not took and not rejected
        else:
            ok = rejected and not took
        checked += 1
        if not ok:
            wrong.append(f"round {rd} {case}: participant {took}, rejected {rejected}, dropped {dropped}")
    verdict("hostile-outcomes", not wrong and checked,
            f"{checked} rounds with a hostile answer checked against the ledger; wrong: {wrong[:10] or 'none'}")
    twice_rounds = {rd for rd, r in latest.items() if r["case"] == "twice"}
    verdict("hostile-never-aggregated", set(hostile_in) <= twice_rounds,
            f"{a.hostile_site} a participant in rounds {hostile_in[:20]} (only its valid 'twice' updates may be: "
            f"{sorted(set(hostile_in) - twice_rounds)[:20] or 'none other'}); its update rejected in "
            f"{hostile_rejected} rounds")
    sys.path.insert(0, os.path.dirname(PEER))
    import fedl_peer
    unsent = [c for c in fedl_peer.CASES if c not in per_case]
    verdict("hostile-coverage", not unsent, f"cases never sent in a round: {unsent}" if unsent else
            f"every case of fedl_peer.py sent ({sum(per_case.values())} in all)")

    # -- samples: 100-round windows
    rows = read_samples(run)
    W, warm = a.window, a.warmup
    windows = {}
    for s in rows:
        if s["done"] >= a.rounds:
            continue  # the federation is over: the sites are gone
        w = min(s["done"] // W, (a.rounds - 1) // W) + 1  # the window of the round in progress
        s["window"] = w
        s["warm"] = s["done"] - (w - 1) * W >= warm  # past the first rounds of the window (a new coordinator)
        windows.setdefault(w, []).append(s)
    table = []
    for w in sorted(windows):
        ss = [s for s in windows[w] if s["warm"]] or windows[w]
        quiet = [s for s in ss if not s["strangers"]] or ss
        third = max(1, len(ss) // 3)
        qthird = max(1, len(quiet) // 3)
        table.append({
            "window": w, "rounds": f"{(w - 1) * W + 1}-{min(w * W, a.rounds)}", "samples": len(windows[w]),
            "instances": sorted({s["instance"] for s in windows[w]}),
            "rss_median_kib": median([s["rss"] for s in ss]), "rss_max_kib": max(s["rss"] for s in windows[w]),
            "hwm_max_kib": max(s["hwm"] for s in windows[w]),
            "rss_first_third_kib": median([s["rss"] for s in ss[:third]]),
            "rss_last_third_kib": median([s["rss"] for s in ss[-third:]]),
            "fds_median": median([s["fds"] for s in quiet]), "fds_min": min(s["fds"] for s in windows[w]),
            "fds_max": max(s["fds"] for s in windows[w]),
            "fds_first_third": median([s["fds"] for s in quiet[:qthird]]),
            "fds_last_third": median([s["fds"] for s in quiet[-qthird:]]),
            "threads_median": median([s["threads"] for s in ss]),
        })
    tol_kib = a.rss_tolerance_mb * 1024
    if len(table) >= 2:
        first, last = table[0], table[-1]
        grow = last["rss_median_kib"] - first["rss_median_kib"]
        verdict("rss-across-windows", grow <= tol_kib,
                f"median RSS {mb(first['rss_median_kib'])} MB (rounds {first['rounds']}) -> "
                f"{mb(last['rss_median_kib'])} MB (rounds {last['rounds']}): {grow / 1024:+.1f} MB, "
                f"limit +{a.rss_tolerance_mb} MB")
        grow_fd = last["fds_median"] - first["fds_median"]
        verdict("fds-across-windows", grow_fd <= a.fd_tolerance,
                f"median descriptors {first['fds_median']:g} -> {last['fds_median']:g}: {grow_fd:+g}, "
                f"limit +{a.fd_tolerance}")
    else:  # a run of one window (ROUNDS <= WINDOW): nothing to compare
        verdict("rss-across-windows", True, f"not checked: {len(table)} window(s) sampled")
        verdict("fds-across-windows", True, f"not checked: {len(table)} window(s) sampled")
    bad_in = [t["window"] for t in table if t["rss_last_third_kib"] - t["rss_first_third_kib"] > tol_kib]
    verdict("rss-within-windows", not bad_in and table, "windows whose RSS grew more than "
            f"{a.rss_tolerance_mb} MB from their first to their last third: {bad_in or 'none'}")
    bad_fd = [t["window"] for t in table if t["fds_last_third"] - t["fds_first_third"] > a.fd_tolerance]
    verdict("fds-within-windows", not bad_fd and table, "windows whose descriptors grew more than "
            f"{a.fd_tolerance} from their first to their last third: {bad_fd or 'none'}")

    # -- events: counts and figures
    count = {}
    for _, kind, _ in events:
        count[kind] = count.get(kind, 0) + 1
    wall = next((float(rest) for _, kind, rest in events if kind == "wall"), None)
    stops = [rest for _, kind, rest in events if kind == "serve-stop"]
    recoveries = [float(rest.split()[1]) for _, kind, rest in events if kind == "recovered"]

    # -- print
    p = print
    p("")
    p("==== fedl soak: summary ====")
    p(f"run folder       {os.path.abspath(run)}")
    for _, kind, rest in events:
        if kind == "binary":
            sha, day, clock, path = (rest.split(" ", 3) + ["", "", "", ""])[:4]
            p(f"fedl             {path} (sha256 {sha}..., built {day} {clock})")
    p(f"rounds           {len(R)} of {a.rounds} in the ledger ({len(F)} failed attempts recorded)")
    p(f"wall time        {wall:.0f} s ({wall / 60:.1f} min), {len(R) / wall * 60:.1f} rounds/min" if wall else
      "wall time        ?")
    p(f"coordinator      {count.get('serve-start', 0)} starts; stops: {', '.join(stops) or 'none'}")
    if recoveries:
        p(f"                 restart -> next round in the ledger: {', '.join(f'{x:.1f}' for x in recoveries)} s")
    p(f"site churn       {count.get('site-kill', 0)} kill -9 of fedl join, {count.get('site-start', 0)} starts "
      f"(incl. the first {a.sites})")
    p(f"hostile site     {a.hostile_site}: {sum(per_case.values())} cases sent in rounds "
      f"({', '.join(f'{c} {per_case.get(c, 0)}' for c in fedl_peer.CASES)}); "
      f"{strangers_runs} strangers runs, {strangers_opened} bare connections; {peer_errors} peer runs not rc 0")
    if rows:
        s0, s1 = rows[0], rows[-1]
        p(f"samples          {len(rows)} (every {a.interval:g} s); first: RSS {mb(s0['rss'])} MB, {s0['fds']} fds; "
          f"last: RSS {mb(s1['rss'])} MB, HWM {mb(s1['hwm'])} MB, {s1['fds']} fds")
    p("")
    p(f"coordinator per {W}-round window (medians after the window's first "
      f"{warm} rounds; descriptors without strangers running):")
    p(f"  {'rounds':>9} {'inst':>4} {'samples':>7} {'RSS MB':>7} {'thirds':>11} {'max':>6} {'HWM max':>7} "
      f"{'fds':>5} {'thirds':>7} {'min-max':>8} {'threads':>7}")
    for t in table:
        thirds = f"{mb(t['rss_first_third_kib'])}/{mb(t['rss_last_third_kib'])}"
        fthirds = f"{t['fds_first_third']:g}/{t['fds_last_third']:g}"
        p(f"  {t['rounds']:>9} {','.join(map(str, t['instances'])):>4} {t['samples']:>7} "
          f"{mb(t['rss_median_kib']):>7} {thirds:>11} {mb(t['rss_max_kib']):>6} {mb(t['hwm_max_kib']):>7} "
          f"{t['fds_median']:>5g} {fthirds:>7} {str(t['fds_min']) + '-' + str(t['fds_max']):>8} "
          f"{t['threads_median']:>7g}")
    p("")
    p("verdicts:")
    for name, ok, detail in verdicts:
        p(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [v for v in verdicts if not v[1]]
    p("")
    p(f"soak: {'PASSED' if not failed else 'FAILED (' + ', '.join(v[0] for v in failed) + ')'}")
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump({"rounds": len(R), "wall_seconds": wall, "windows": table, "hostile_cases": per_case,
                   "strangers_runs": strangers_runs, "strangers_opened": strangers_opened, "events": count,
                   "recoveries": recoveries, "verdicts": [{"name": n, "ok": o, "detail": d} for n, o, d in verdicts]},
                  f, indent=1, sort_keys=True)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description="helpers of tests/soak/soak.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("dir")
    s.add_argument("--interval", type=float, default=2.0)
    s = sub.add_parser("rounds")
    s.add_argument("dir")
    s = sub.add_parser("hostile")
    s.add_argument("dir")
    s.add_argument("--server", required=True)
    s.add_argument("--bundle", required=True)
    s.add_argument("--ca", required=True)
    s.add_argument("--strangers-every", type=int, default=6)
    s.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("report")
    s.add_argument("dir")
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--sites", type=int, required=True)
    s.add_argument("--hostile-site", required=True)
    s.add_argument("--window", type=int, default=100)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--interval", type=float, default=2.0)
    s.add_argument("--rss-tolerance-mb", type=float, default=10.0)
    s.add_argument("--fd-tolerance", type=int, default=2)
    a = ap.parse_args()
    sys.exit({"sample": cmd_sample, "rounds": cmd_rounds, "hostile": cmd_hostile, "report": cmd_report}[a.cmd](a) or 0)


if __name__ == "__main__":
    main()
