#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Helpers of bench/round_bench.sh (standard library only).

  round_bench.py data SRC.csv.gz OUT.csv ROWS
      the first ROWS rows of SRC (cycled if it has fewer), for a few samples per site
  round_bench.py monitor --root DIR --exe NAME --out OUT.json --stop FILE [--interval S] [--min-avail-mb M]
      samples /proc until FILE exists: every process whose argv[0] is NAME and whose command line
      names DIR (fedl serve, fedl join, their fedl __worker children), their peak RSS (VmHWM) and
      the sum of their RSS, trainers alive at once, and MemAvailable. If MemAvailable falls below
      M MB it kills those processes (by pid; they are the benchmark's own) and records why.
  round_bench.py report --ws WS --tmp DIR ... (see report())
      reads the ledger, the JSON logs of serve and the sites, /usr/bin/time -v of serve, the
      monitor's samples and fedl_tls_push_bench's JSON, and prints the figures (medians).
"""

import argparse
import datetime as dt
import glob
import gzip
import json
import os
import re
import signal
import statistics
import sys
import time


def cmd_data(args):
    opener = gzip.open if args.src.endswith(".gz") else open
    with opener(args.src, "rt") as f:
        rows = [line for line in f if line.strip()]
    with open(args.out, "w") as out:
        for i in range(args.rows):
            out.write(rows[i % len(rows)])


# ---------------------------------------------------------------------------------------------
# monitor


def read_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line[:5]] = int(line.split()[1])  # kB
    except OSError:
        return None
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_cpu(pid):
    """(user + system CPU seconds, minor page faults) of a process (all its threads), or None once
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[7])  # utime, stime; minflt


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine, all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])
    idle = v[3] + v[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                out[k] = int(v.split()[0])
    return out


def classify(argv):
    # A fork server's trainers are forks of it and show its command line: its CPU and theirs
    # count as the trainers'.
    if "__worker" in argv or "__fork-server" in argv:
        kind = "worker"
    elif "serve" in argv:
        kind = "serve"
    elif "join" in argv:
        kind = "join"
    else:
        return None, None
    site = None
    for a in argv:
        m = re.search(r"clients/([^/]+)", a)
        if m:
            site = m.group(1)
            break
    return kind, site


def cmd_monitor(args):
    seen = {}  # pid -> {"kind", "site", "hwm", "rss"}
    skip = set()
    peak_total = {"serve": 0, "join": 0, "worker": 0, "all": 0}
    max_workers = 0
    mem = meminfo()
    min_avail = mem.get("MemAvailable", 0)
    aborted = None
    samples = 0
    # [time, serve CPU s, joins CPU s, trainers CPU s, machine busy CPU s, machine CPU s, serve minor faults]
    series = []
    while not os.path.exists(args.stop):
        totals = {"serve": 0, "join": 0, "worker": 0}
        workers = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in skip:
                continue
            if pid not in seen:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
                except OSError:
                    continue
                if not argv or os.path.basename(argv[0]) != args.exe or not any(args.root in a for a in argv):
                    skip.add(pid)
                    continue
                kind, site = classify(argv)
                if kind is None:
                    skip.add(pid)
                    continue
                seen[pid] = {"kind": kind, "site": site, "hwm": 0, "rss": 0, "cpu": 0.0, "minflt": 0}
            st = read_status(pid)
            cpu = read_cpu(pid)
            if st is None or cpu is None:
                continue
            p = seen[pid]
            p["cpu"], p["minflt"] = cpu
            p["hwm"] = max(p["hwm"], st.get("VmHWM", 0))
            p["rss"] = max(p["rss"], st.get("VmRSS", 0))
            totals[p["kind"]] += st.get("VmRSS", 0)
            if p["kind"] == "worker":
                workers += 1
        for k, v in totals.items():
            peak_total[k] = max(peak_total[k], v)
        peak_total["all"] = max(peak_total["all"], sum(totals.values()))
        max_workers = max(max_workers, workers)
        avail = meminfo().get("MemAvailable", 0)
        min_avail = min(min_avail, avail)
        samples += 1
        busy, total = machine_cpu()
        cpu = {"serve": 0.0, "join": 0.0, "worker": 0.0}
        for p in seen.values():
            cpu[p["kind"]] += p["cpu"]  # the last value seen, also for processes that ended
        serve_faults = sum(p["minflt"] for p in seen.values() if p["kind"] == "serve")
        series.append([time.time(), cpu["serve"], cpu["join"], cpu["worker"], busy, total, serve_faults])
        if aborted is None and args.min_avail_mb > 0 and avail < args.min_avail_mb * 1024:
            aborted = f"MemAvailable {avail // 1024} MB < {args.min_avail_mb} MB: killed the benchmark's processes"
            for pid, p in seen.items():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(args.interval)
    with open(args.out, "w") as f:
        json.dump(
            {
                "processes": [{"pid": pid, **p} for pid, p in seen.items()],
                "peak_total_kb": peak_total,
                "max_workers": max_workers,
                "mem_total_kb": mem.get("MemTotal", 0),
                "min_available_kb": min_avail,
                "samples": samples,
                "interval": args.interval,
                "aborted": aborted,
                "cpu_series": series,
            },
            f,
        )


# ---------------------------------------------------------------------------------------------
# report


def ts(text):
    """ISO UTC with milliseconds -> seconds since the epoch."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def read_json_lines(path):
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return out


def med(values):
    return statistics.median(values) if values else float("nan")


def fmt_ms(seconds):
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.1f} ms"


def cmd_report(args):
    ws, tmp = args.ws, args.tmp
    ledger = read_json_lines(os.path.join(ws, "ledger.jsonl"))
    rounds = {e["body"]["round"]: e for e in ledger if e.get("kind") == "round"}
    failed = [e for e in ledger if e.get("kind") == "round-failed"]
    timed = [r for r in sorted(rounds) if r > args.warmup]
    ledger_cycle = [ts(rounds[r]["time"]) - ts(rounds[r - 1]["time"]) for r in timed if r - 1 in rounds]
    updates_in = [rounds[r]["body"]["seconds"] for r in timed]

    serve_log = read_json_lines(os.path.join(tmp, "serve.log"))
    start, done_at, closing, arrivals, coord_seconds = {}, {}, {}, {}, {}
    for e in serve_log:
        msg, t = e.get("msg", ""), ts(e["time"])
        if m := re.match(r"round (\d+)/\d+(?: \(attempt \d+\))?: training on", msg):
            start[int(m.group(1))] = t
        elif m := re.match(r"round (\d+)/\d+ done: .*, ([0-9.]+) s$", msg):
            done_at[int(m.group(1))] = t
            coord_seconds[int(m.group(1))] = float(m.group(2))
        elif m := re.match(r"round (\d+): closing the attempt", msg):
            closing[int(m.group(1))] = t
        elif m := re.match(r"round (\d+): update from (\S+)", msg):
            arrivals.setdefault(int(m.group(1)), []).append(t)
    coord = [coord_seconds[r] for r in timed if r in coord_seconds]
    commit = [done_at[r] - closing[r] for r in timed if r in done_at and r in closing]
    gap = [start[r] - done_at[r - 1] for r in timed if r in start and r - 1 in done_at]

    # Sites: launch -> "connected", and the per-round critical path.
    launches = {}
    with open(os.path.join(tmp, "launch.txt")) as f:
        for line in f:
            site, t = line.split()
            launches[site] = float(t)
    connect_s = []
    task_in, trained, sent = {}, {}, {}
    for site, t0 in launches.items():
        for e in read_json_lines(os.path.join(tmp, f"{site}.log")):
            msg, t = e.get("msg", ""), ts(e["time"])
            if msg.startswith("connected to ") and site not in [s for s, _ in connect_s]:
                connect_s.append((site, t - t0))
            elif m := re.match(r"round (\d+): training$", msg):
                task_in.setdefault(int(m.group(1)), []).append(t)
            elif m := re.match(r"round (\d+): trained ", msg):
                trained.setdefault(int(m.group(1)), []).append(t)
            elif m := re.match(r"round (\d+): update sent", msg):
                sent.setdefault(int(m.group(1)), []).append(t)
    connect = [c for _, c in connect_s]
    phase = {"down": [], "train": [], "sign": [], "up": [], "commit": commit, "gap": gap}
    for r in timed:
        if r not in start or r not in task_in or r not in trained or r not in sent or r not in arrivals:
            continue
        phase["down"].append(max(task_in[r]) - start[r])
        phase["train"].append(max(trained[r]) - max(task_in[r]))
        phase["sign"].append(max(sent[r]) - max(trained[r]))
        phase["up"].append(max(arrivals[r]) - max(sent[r]))

    serve_rss_kb = None
    try:
        with open(os.path.join(tmp, "serve.time")) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    serve_rss_kb = int(line.split(":")[1])
    except OSError:
        pass
    mon = {}
    try:
        with open(os.path.join(tmp, "monitor.json")) as f:
            mon = json.load(f)
    except (OSError, json.JSONDecodeError):
        pass
    procs = mon.get("processes", [])
    # CPU per timed round, by process kind, between the ledger entries of round `warmup` and of
    # the last round (cumulative CPU interpolated between the monitor's samples).
    cpu_round = {}
    series = mon.get("cpu_series", [])
    if len(series) >= 2 and args.warmup in rounds and timed:
        t0, t1 = ts(rounds[args.warmup]["time"]), ts(rounds[timed[-1]]["time"])

        def at(t, col):
            for a, b in zip(series, series[1:]):
                if a[0] <= t <= b[0]:
                    return a[col] + (b[col] - a[col]) * (t - a[0]) / ((b[0] - a[0]) or 1)
            return series[-1][col] if t > series[-1][0] else series[0][col]

        if series[0][0] <= t0 and t1 <= series[-1][0]:
            k = len(timed)
            for col, name in ((1, "serve"), (2, "join"), (3, "worker"), (4, "machine"), (5, "capacity"),
                              (6, "serve_minflt")):
                cpu_round[name] = (at(t1, col) - at(t0, col)) / k
            cpu_round["others"] = cpu_round["machine"] - cpu_round["serve"] - cpu_round["join"] - cpu_round["worker"]
    join_hwm = [p["hwm"] / 1024 for p in procs if p["kind"] == "join"]
    worker_hwm = [p["hwm"] / 1024 for p in procs if p["kind"] == "worker"]
    push = {}
    for name in ("push.json", "push_files.json"):
        try:
            with open(os.path.join(tmp, name)) as f:
                push[name] = json.loads(f.read().strip().splitlines()[-1])
        except (OSError, json.JSONDecodeError, IndexError):
            pass

    model_mb = args.model_bytes / 1e6
    limit_mb = 3 * model_mb + 100
    serve_mb = serve_rss_kb / 1024 if serve_rss_kb else float("nan")
    per_round = args.per_round or args.n
    print(
        f"networked round: N = {args.n} sites connected, {per_round} asked per round, P = {args.params:,} parameters "
        f"(mlp:{args.hidden}, model file {model_mb:.1f} MB), {len(rounds)} rounds, first {args.warmup} dropped"
        + (f", {len(failed)} attempts failed" if failed else "")
    )
    print(f"  round time, ledger entry to entry            median {fmt_ms(med(ledger_cycle))}"
          + (f"  (min {fmt_ms(min(ledger_cycle))}, max {fmt_ms(max(ledger_cycle))}, {len(ledger_cycle)} rounds)" if ledger_cycle else ""))
    print(f"  round time, coordinator (tasks -> ledger)    median {fmt_ms(med(coord))}")
    print(f"    tasks sent -> all updates in (ledger)      median {fmt_ms(med(updates_in))}")
    print(f"    all updates in -> ledger entry written     median {fmt_ms(med(commit))}")
    if "push.json" in push:
        t = push["push.json"]
        ratio = med(ledger_cycle) / (t["round_ms"] / 1e3) if ledger_cycle else float("nan")
        print(f"  transport alone (fedl_tls_push_bench, N = {t['n']}, same P)  median {t['round_ms']:.1f} ms "
              f"({t['mb_per_s']:.0f} MB/s both ways); round / transport = {ratio:.1f}x")
    if "push_files.json" in push:
        t = push["push_files.json"]
        print(f"  transport, updates written to files          median {t['round_ms']:.1f} ms ({t['mb_per_s']:.0f} MB/s)")
    print(f"  critical path (medians): tasks out {fmt_ms(med(phase['down']))} | last task in -> last trained "
          f"{fmt_ms(med(phase['train']))} | -> last update sent {fmt_ms(med(phase['sign']))} | -> last update in "
          f"{fmt_ms(med(phase['up']))} | commit {fmt_ms(med(phase['commit']))} | next round starts "
          f"{fmt_ms(med(phase['gap']))}")
    if cpu_round:
        cap = cpu_round["capacity"]
        print(f"  CPU per timed round: fedl serve {cpu_round['serve'] * 1e3:.0f} ms, fedl join (all) "
              f"{cpu_round['join'] * 1e3:.0f} ms, trainers (all) {cpu_round['worker'] * 1e3:.0f} ms; other processes "
              f"on the machine {cpu_round['others'] * 1e3:.0f} ms; machine busy {100 * cpu_round['machine'] / cap:.0f}% "
              f"of {os.cpu_count()} CPUs")
        print(f"  coordinator page faults per timed round      {cpu_round['serve_minflt']:.0f} minor "
              f"({cpu_round['serve_minflt'] * 4 / 1024:.1f} MB of 4 KiB pages)")
    verdict = "met" if serve_mb <= limit_mb else "NOT met"
    print(f"  coordinator peak RSS (/usr/bin/time -v)      {serve_mb:.0f} MB; limit 3 x model + 100 MB = {limit_mb:.0f} MB: {verdict}")
    print(f"  fedl join: launch -> \"connected\"             median {fmt_ms(med(connect))}"
          + (f" (max {fmt_ms(max(connect))}, {len(connect)} sites)" if connect else ""))
    if join_hwm:
        print(f"  fedl join peak RSS (session, VmHWM)          median {med(join_hwm):.0f} MB (max {max(join_hwm):.0f} MB)")
    if worker_hwm:
        print(f"  trainer child peak RSS                       median {med(worker_hwm):.0f} MB (max {max(worker_hwm):.0f} MB); "
              f"{len(worker_hwm)} started, at most {mon.get('max_workers', 0)} alive at once")
    if mon:
        pt = mon["peak_total_kb"]
        print(f"  memory: all fedl processes' RSS peak {pt['all'] / 1024:.0f} MB (joins {pt['join'] / 1024:.0f}, "
              f"trainers {pt['worker'] / 1024:.0f}); MemAvailable min {mon['min_available_kb'] / 1024:.0f} of "
              f"{mon['mem_total_kb'] / 1024:.0f} MB")
        if mon.get("aborted"):
            print(f"  ABORTED: {mon['aborted']}")
    result = {
        "n": args.n, "per_round": per_round, "params": args.params, "hidden": args.hidden,
        "model_bytes": args.model_bytes, "rounds": len(rounds), "warmup": args.warmup,
        "round_ms_ledger": med(ledger_cycle) * 1e3, "round_ms_coordinator": med(coord) * 1e3,
        "updates_in_ms": med(updates_in) * 1e3, "commit_ms": med(commit) * 1e3,
        "phases_ms": {k: med(v) * 1e3 for k, v in phase.items()},
        "transport_ms": push.get("push.json", {}).get("round_ms"),
        "transport_files_ms": push.get("push_files.json", {}).get("round_ms"),
        "serve_peak_rss_mb": serve_mb, "serve_rss_limit_mb": limit_mb,
        "join_connect_ms": med(connect) * 1e3, "join_connect_ms_max": max(connect) * 1e3 if connect else None,
        "join_peak_rss_mb": med(join_hwm) if join_hwm else None,
        "join_peak_rss_mb_max": max(join_hwm) if join_hwm else None,
        "worker_peak_rss_mb": med(worker_hwm) if worker_hwm else None,
        "workers_started": len(worker_hwm), "workers_max_alive": mon.get("max_workers"),
        "all_rss_peak_mb": mon.get("peak_total_kb", {}).get("all", 0) / 1024,
        "min_available_mb": mon.get("min_available_kb", 0) / 1024,
        "aborted": mon.get("aborted"),
        "cpu_ms_per_round": {k: v * 1e3 for k, v in cpu_round.items() if k != "serve_minflt"},
        "serve_minor_faults_per_round": cpu_round.get("serve_minflt"),
        "failed_attempts": len(failed),
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if len(timed) > 0 and not mon.get("aborted") else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("src")
    d.add_argument("out")
    d.add_argument("rows", type=int)
    m = sub.add_parser("monitor")
    m.add_argument("--root", required=True)
    m.add_argument("--exe", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--stop", required=True)
    m.add_argument("--interval", type=float, default=0.25)
    m.add_argument("--min-avail-mb", type=int, default=1500)
    r = sub.add_parser("report")
    r.add_argument("--ws", required=True)
    r.add_argument("--tmp", required=True)
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--per-round", type=int, default=0)
    r.add_argument("--params", type=int, required=True)
    r.add_argument("--hidden", type=int, required=True)
    r.add_argument("--model-bytes", type=int, required=True)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--json-out")
    args = ap.parse_args()
    if args.cmd == "data":
        return cmd_data(args)
    if args.cmd == "monitor":
        return cmd_monitor(args)
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
