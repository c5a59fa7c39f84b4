#!/usr/bin/env python3
"""The check-mail benchmark's driver (run it through run.sh, which prepares everything).

Compares, on the test Dovecot's users bench1..bench4 (4 mailboxes):
  (a) `eventCheckMail` in the extension (check.php: a host that stores nothing),
  (b) PHP's ext-imap loop (ext-imap.php: imap_open, then imap_fetchheader + imap_body per message),
  (c) the floor (floor.py: one batched fetch per mailbox, all mailboxes in parallel, no parsing),
over our own delay proxy (tests/servers/delay_proxy.py --stats: +DELAY ms each way, one listen
port per mailbox so round trips are counted per mailbox) and directly (no delay). Every run
starts from freshly seeded mailboxes (all messages new and unseen) and checks its counts.
Wall time and peak RSS come from /usr/bin/time -v around the whole process.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Messages from this size on go through the extension's large-message gate (incoming/gate.rs).
LARGE = 64 * 1024
USERS = [f"bench{i}@test.local" for i in range(1, 5)]


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"bench.py: {name} is not set (run through benches/checkmail/run.sh)")
    return value


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.results = []
        self.proxy = None
        self.stats_path = os.path.join(self.work, "proxy-stats.jsonl")
        self.manifest = json.load(open(os.path.join(args.corpus, "manifest.json")))
        self.tls = not args.plain
        self.direct = {
            "IMAP": int(env("PCR_IMAPS_PORT" if self.tls else "PCR_IMAP_PORT")),
            "POP3": int(env("PCR_POP3S_PORT" if self.tls else "PCR_POP3_PORT")),
        }
        base = args.proxy_port
        self.proxied = {"IMAP": [base + i for i in range(4)], "POP3": [base + 4 + i for i in range(4)]}

    # ---- servers ---------------------------------------------------------------------
    def start_proxy(self):
        for port in self.proxied["IMAP"] + self.proxied["POP3"]:
            with socket.socket() as s:
                # As the proxy will: connections of an earlier run may linger in TIME_WAIT.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    sys.exit(f"bench.py: port {port} is in use; pick another base with --proxy-port")
        maps = [f"{p}:127.0.0.1:{self.direct[proto]}" for proto in ("IMAP", "POP3") for p in self.proxied[proto]]
        open(self.stats_path, "w").close()
        logf = open(os.path.join(self.work, "proxy.log"), "w")
        self.proxy = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/servers/delay_proxy.py"), "--delay-ms",
             str(self.args.delay_ms), "--stats", self.stats_path] + maps,
            stdout=logf, stderr=logf)
        deadline = time.time() + 10
        for port in self.proxied["IMAP"] + self.proxied["POP3"]:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or self.proxy.poll() is not None:
                        sys.exit("bench.py: the delay proxy did not start (see proxy.log)")
                    time.sleep(0.05)
        time.sleep(0.2 + self.args.delay_ms / 1000)  # the probe connections' stats lines

    def stop_proxy(self):
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.proxy = None

    # ---- mailboxes -------------------------------------------------------------------
    def seed(self, count, small_only=False):
        """Empties bench1..4 and delivers the first `count` corpus messages of each (unseen);
        returns the bytes delivered."""
        delivered = 0
        root = env("PCR_MAIL_ROOT")
        owner = os.stat(root)  # the mail user Dovecot runs mailbox processes as
        for i, user in enumerate(USERS, 1):
            md = os.path.join(root, user, "Maildir")
            shutil.rmtree(md, ignore_errors=True)
            for sub in ("new", "cur", "tmp"):
                os.makedirs(os.path.join(md, sub))
            for path in corpus_files(self.args.corpus, i, count, small_only):
                name = os.path.basename(path)
                with open(path, "rb") as f:
                    data = f.read()
                delivered += len(data)
                # Named as Dovecot's own delivery (LDA/LMTP) names them: S= the file's size,
                # W= its size with CRLF line ends (RFC822.SIZE), so no file is read to list it.
                vsize = len(data) + data.count(b"\n") - data.count(b"\r\n")
                base = name.split(",", 1)[0]
                with open(os.path.join(md, "new", f"{base},S={len(data)},W={vsize}"), "wb") as f:
                    f.write(data)
            for dirpath, dirs, files in os.walk(os.path.join(root, user)):
                for n in dirs + files:
                    os.chown(os.path.join(dirpath, n), owner.st_uid, owner.st_gid)
            os.chown(os.path.join(root, user), owner.st_uid, owner.st_gid)
            # Let Dovecot index the new mail now, not inside the measured run.
            out = subprocess.run([env("PCR_DOVEADM"), "-c", env("PCR_DOVECOT_CONF"), "mailbox", "status",
                                  "-u", user, "messages unseen", "INBOX"], capture_output=True, text=True)
            if out.returncode != 0 or f"messages={count} unseen={count}" not in out.stdout:
                sys.exit(f"bench.py: seeding {user} failed: {out.stdout.strip()} {out.stderr.strip()}")
        return delivered

    def check_processed(self, protocol, count, label):
        """After (a): IMAP mail is all \\Seen and still there; POP3 mail is deleted."""
        want = f"messages={count} unseen=0" if protocol == "IMAP" else "messages=0 unseen=0"
        for user in USERS:
            out = subprocess.run([env("PCR_DOVEADM"), "-c", env("PCR_DOVECOT_CONF"), "mailbox", "status",
                                  "-u", user, "messages unseen", "INBOX"], capture_output=True, text=True)
            if want not in out.stdout:
                sys.exit(f"bench.py: {label}: {user} has {out.stdout.strip()} after the run, expected {want}")

    # ---- one measured process --------------------------------------------------------
    def timed(self, cmd, extra_env, label):
        tfile = os.path.join(self.work, "time.txt")
        e = dict(os.environ)
        # As on a Debian host, where nothing sets it: with SSL_CERT_FILE set (some build and CI
        # environments set it), the extension reads that whole CA bundle (~25 ms of CPU), as
        # OpenSSL itself does, instead of looking roots up in the hashed /etc/ssl/certs.
        e.pop("SSL_CERT_FILE", None)
        e.update(extra_env)
        offset = os.path.getsize(self.stats_path) if os.path.exists(self.stats_path) else 0
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", tfile] + cmd, env=e, capture_output=True, text=True,
                              timeout=self.args.timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"bench.py: {label} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        out = json.loads(lines[-1])
        t = {}
        for ln in open(tfile):
            k, _, v = ln.strip().rpartition(": ")
            t[k] = v
        wall = t["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
        seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
        res = {
            "wall": seconds,
            "cpu": float(t["User time (seconds)"]) + float(t["System time (seconds)"]),
            "rss_kb": int(t["Maximum resident set size (kbytes)"]),
            "out": out,
        }
        if self.proxy is not None:
            time.sleep(0.3 + 3 * self.args.delay_ms / 1000)  # connections close after the delay
            res["round_trips"] = self.round_trips(offset)
        return res

    def round_trips(self, offset):
        """Round trips per mailbox (all its connections) from the proxy's stats since `offset`."""
        per_port = {}
        with open(self.stats_path) as f:
            f.seek(offset)
            for ln in f:
                s = json.loads(ln)
                if s["c2s_bytes"] == 0 and s["s2c_bytes"] == 0:
                    continue  # our own port probe
                d = per_port.setdefault(s["listen"], {"connections": 0, "round_trips": 0, "waits": 0})
                d["connections"] += 1
                d["round_trips"] += s["round_trips"]
                d["waits"] += s["waits"]
        return [per_port[p] for p in sorted(per_port)]

    def bench_env(self, protocol, count, delayed):
        ports = self.proxied[protocol] if delayed else [self.direct[protocol]] * 4
        return {
            "BENCH_PROTOCOL": protocol, "BENCH_HOST": "127.0.0.1", "BENCH_PORTS": ",".join(map(str, ports)),
            "BENCH_USERS": ",".join(USERS), "BENCH_SSL": "SSL" if self.tls else "", "BENCH_CA": env("PCR_TEST_CA"),
            "BENCH_EXPECT": str(count),
        }

    def run(self, method, protocol, count, delayed, repeat_index=0):
        # "m" and "s": (a) for the memory comparison, on every message / on small ones only.
        delivered = self.seed(count, small_only=method == "s")
        e = self.bench_env(protocol, count, delayed)
        label = f"({method}) {protocol} {count}/mailbox {'+%gms' % self.args.delay_ms if delayed else 'no delay'}"
        if method in ("a", "t", "m", "s"):
            rundir = tempfile.mkdtemp(prefix="run-", dir=self.work)  # fresh STATE_DIR
            if method == "t":  # diagnosis: the state store on tmpfs, where fsync costs nothing
                e["BENCH_STATE_DIR"] = tempfile.mkdtemp(prefix="pcr-bench-state-", dir="/dev/shm")
            cmd = ["php", "-n", "-d", f"extension={self.args.so}", "-d", "memory_limit=-1",
                   os.path.join(HERE, "check.php"), rundir]
        elif method == "b":
            cmd = ["php", "-d", "memory_limit=-1", os.path.join(HERE, "ext-imap.php")]
        else:
            ports = e["BENCH_PORTS"]
            cmd = [sys.executable, os.path.join(HERE, "floor.py"), "--protocol", protocol.lower(), "--ports", ports,
                   "--users", e["BENCH_USERS"]] + (["--tls", "--ca", e["BENCH_CA"]] if self.tls else [])
        res = self.timed(cmd, e, label)
        if method in ("a", "t", "m", "s"):
            self.check_processed(protocol, count, label)
            shutil.rmtree(rundir, ignore_errors=True)
            if "BENCH_STATE_DIR" in e:
                shutil.rmtree(e["BENCH_STATE_DIR"], ignore_errors=True)
        if method == "c":
            got = [m["messages"] for m in res["out"]["mailboxes"]]
            if got != [count] * 4:
                sys.exit(f"bench.py: {label}: the floor read {got} messages, expected {count} each")
        res.update(method=method, protocol=protocol, count=count, delay_ms=self.args.delay_ms if delayed else 0,
                   messages=4 * count, bytes=delivered, repeat=repeat_index)
        if (res["out"].get("first_call_seconds") or 0) > 1.5:
            log(f"{label}: the first host call came only after {res['out']['first_call_seconds']:.1f} s "
                "(a login stalled? other tests failing logins from 127.0.0.1 make Dovecot delay them)")
        if res["out"].get("log_errors"):
            log(f"{label}: the host's logError was called {res['out']['log_errors']} times, first: "
                f"{res['out']['log_error_first']}")
        rt = res.get("round_trips")
        log(f"{label}: {res['wall']:.2f} s, cpu {res['cpu']:.2f} s, rss {res['rss_kb'] / 1024:.0f} MB"
            + (f", round trips/mailbox {[m['round_trips'] for m in rt]}" if rt else ""))
        self.results.append(res)
        return res

    def baseline(self):
        e = self.bench_env("IMAP", 0, False)
        e["BENCH_BASELINE"] = "1"
        rundir = tempfile.mkdtemp(prefix="base-", dir=self.work)
        res = self.timed(["php", "-n", "-d", f"extension={self.args.so}", os.path.join(HERE, "check.php"), rundir],
                         e, "baseline")
        shutil.rmtree(rundir, ignore_errors=True)
        return res["rss_kb"]


def corpus_files(corpus, mailbox, count, small_only=False):
    """The first `count` corpus files of a mailbox; `small_only`: of those under LARGE bytes."""
    src = os.path.join(corpus, str(mailbox))
    names = sorted(os.listdir(src))
    if small_only:
        names = [m for m in names if os.path.getsize(os.path.join(src, m)) < LARGE]
    if len(names) < count:
        sys.exit(f"bench.py: corpus mailbox {mailbox} has only {len(names)} such messages, {count} wanted")
    return [os.path.join(src, m) for m in names[:count]]


def median(xs):
    return statistics.median(xs) if xs else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--so", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--count", type=int, default=500, help="messages per mailbox (the corpus must have them)")
    p.add_argument("--small", type=int, default=100, help="the smaller count, to show round trips don't grow")
    p.add_argument("--delay-ms", type=float, default=10)
    p.add_argument("--repeat", type=int, default=3, help="(a) and (c) run this often, interleaved; medians shown")
    p.add_argument("--ext-imap-delayed", default="20,100",
                   help="messages per mailbox for (b) over the delay: two counts are fitted to a line and "
                        "extrapolated to --count; 0 = run it on --count")
    p.add_argument("--memory-count", type=int, default=450,
                   help="messages per mailbox for the memory comparison: every message vs. small ones only "
                        "(the corpus must have that many under 64 KiB)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory comparison (--memory-repeat runs of each side, default 2)")
    p.add_argument("--memory-repeat", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="no TLS (default: implicit TLS, IMAPS/POP3S)")
    p.add_argument("--proxy-port", type=int, default=24890, help="first of 8 ports for the delay proxy")
    p.add_argument("--protocols", default="IMAP,POP3")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--diagnose", action="store_true",
                   help="also run (a) with STATE_DIR on tmpfs (/dev/shm), to show what the disk syncs cost")
    p.add_argument("--report-only", action="store_true", help="print the report of the last run's results.json")
    args = p.parse_args()
    if args.report_only:
        saved = json.load(open(os.path.join(args.work, "results.json")))
        for k, v in saved["args"].items():
            setattr(args, k, v)
        b = argparse.Namespace(results=saved["runs"], tls=not args.plain,
                               manifest=json.load(open(os.path.join(args.corpus, "manifest.json"))))
        print(make_report(b, args, saved["baseline_rss_kb"], saved["elapsed"]))
        return
    os.makedirs(args.work, exist_ok=True)
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    b = Bench(args)
    n, small = args.count, args.small
    b_delayed = [int(x) for x in args.ext_imap_delayed.split(",")]
    if b_delayed == [0]:
        b_delayed = [n]
    started = time.time()
    try:
        b.start_proxy()
        base_kb = b.baseline()
        for proto in args.protocols.split(","):
            for delayed in () if args.memory_only else (True, False):
                for r in range(args.repeat):
                    b.run("a", proto, n, delayed, r)
                    b.run("c", proto, n, delayed, r)
                    if args.diagnose and not delayed:
                        b.run("t", proto, n, delayed, r)
                if proto == "IMAP":
                    # Twice, the faster counts: a login can stall for seconds when other tests
                    # fail logins from 127.0.0.1 meanwhile (Dovecot's per-IP auth penalty).
                    # Without delay as often as (a): its time varies most from run to run.
                    for count in (b_delayed if delayed else [n]):
                        for r in range(2 if delayed else max(2, args.repeat)):
                            b.run("b", proto, count, delayed, r)
            for r in range(args.memory_repeat):
                if not args.memory_only and r < 2:
                    b.run("a", proto, small, True, r)
                    b.run("c", proto, small, True, r)
                b.run("m", proto, args.memory_count, False, r)
                b.run("s", proto, args.memory_count, False, r)
    finally:
        b.stop_proxy()
        # Leave the bench mailboxes empty (64 MB otherwise stays in .testenv).
        try:
            b.seed(0)
        except SystemExit:
            pass
    elapsed = time.time() - started
    report = make_report(b, args, base_kb, elapsed)
    keep = ("count", "small", "memory_count", "delay_ms", "repeat", "plain", "protocols", "load")
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"args": {k: getattr(args, k) for k in keep}, "elapsed": elapsed, "baseline_rss_kb": base_kb,
                   "runs": b.results}, f, indent=1)
    with open(os.path.join(args.work, "results.md"), "w") as f:
        f.write(report)
    print(report)


def make_report(b, args, base_kb, elapsed):
    """The Markdown tables of README.md. Times are the best of the repeated runs (a login can
    stall for seconds when other tests fail logins from 127.0.0.1 at the same time: Dovecot's
    per-IP auth penalty), with the median beside them."""
    rs = b.results
    n = args.count
    largest = max(s for i in range(1, 5) for s in b.manifest["mailboxes"][str(i)][:n])
    total = sum(s for i in range(1, 5) for s in b.manifest["mailboxes"][str(i)][:n])

    def pick(method, proto, count, delay):
        return [r for r in rs if (r["method"], r["protocol"], r["count"], r["delay_ms"]) == (method, proto, count, delay)]

    def best(runs):
        return min(r["wall"] for r in runs)

    def span(values):
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    def rt_text(runs):
        """Direction changes / waits per mailbox, over all mailboxes and runs."""
        per = [m for r in runs if r.get("round_trips") for m in r["round_trips"]]
        if not per:
            return "-"
        text = span([m["round_trips"] for m in per]) + " / " + span([m["waits"] for m in per])
        if max(m["connections"] for m in per) > 1:
            text += f" ({max(m['connections'] for m in per)} conn.)"
        return text

    lines = [
        f"4 mailboxes x {n} messages ({total / 1e6:.1f} MB, largest message {largest / 1e3:.0f} KB), "
        f"{'implicit TLS' if b.tls else 'no TLS'}, delay {args.delay_ms:g} ms each way. Wall time: the best "
        f"of the repeated runs ({args.repeat} for (a) and (c), interleaved; (b) {max(2, args.repeat)} times "
        f"without delay, twice over it), median in brackets. "
        f"Host: {os.cpu_count()} CPUs, load average {args.load} before the run, which took {elapsed:.0f} s.",
    ]
    names = {"a": "(a) eventCheckMail", "b": "(b) ext-imap loop", "c": "(c) floor",
             "t": "(a) with STATE_DIR on tmpfs (diagnosis)"}
    for proto in args.protocols.split(","):
        lines += ["", f"### {proto}", "",
                  "| run | delay | msgs/mailbox | wall s | msgs/s | MB/s | CPU s | peak RSS MB "
                  "| round trips per mailbox (turns / waits) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for delay in (args.delay_ms, 0):
            for method in ("a", "t", "b", "c"):
                counts = sorted({r["count"] for r in rs if r["method"] == method and r["protocol"] == proto
                                 and r["delay_ms"] == delay}, reverse=True)
                for count in counts:
                    runs = pick(method, proto, count, delay)
                    wall, med = best(runs), median([r["wall"] for r in runs])
                    cpu = median([r["cpu"] for r in runs])
                    rss = max(r["rss_kb"] for r in runs) / 1024
                    msgs, byts = runs[0]["messages"], runs[0]["bytes"]
                    wall_text = f"{wall:.2f}" + (f" ({med:.2f})" if len(runs) > 1 else "")
                    lines.append(f"| {names[method]} | {delay:g} ms | {count} | {wall_text} | {msgs / wall:,.0f} | "
                                 f"{byts / wall / 1e6:.1f} | {cpu:.2f} | {rss:.0f} | {rt_text(runs)} |")
        out = []
        for delay in (args.delay_ms, 0):
            a_runs, c_runs = pick("a", proto, n, delay), pick("c", proto, n, delay)
            if a_runs and c_runs:
                paired = [a["wall"] / c["wall"] for a, c in zip(a_runs, c_runs)]
                out.append(f"(a)/(c) at {delay:g} ms: {best(a_runs) / best(c_runs):.1f}x (target: at most 2x; "
                           "paired runs: " + ", ".join(f"{x:.1f}" for x in paired) + ")")
            bruns = {}
            b_all = {}
            for r in rs:
                if (r["method"], r["protocol"], r["delay_ms"]) == ("b", proto, delay):
                    b_all.setdefault(r["count"], []).append(r["wall"])
                    if r["count"] not in bruns or r["wall"] < bruns[r["count"]]["wall"]:
                        bruns[r["count"]] = r
            if bruns and a_runs:
                target = 100 if delay else 4
                if n in bruns:
                    bwall = bruns[n]["wall"]
                    note = (f"; by the medians: {median(b_all[n]) / median([r['wall'] for r in a_runs]):.1f}x "
                            f"({len(b_all[n])} runs of (b), {len(a_runs)} of (a))")
                else:
                    pts = sorted((c, r["wall"]) for c, r in bruns.items())
                    (n1, t1), (n2, t2) = pts[0], pts[-1]
                    k = (t2 - t1) / (n2 - n1) if n2 != n1 else t1 / n1
                    bwall = t1 + k * (n - n1)
                    note = (f"; (b) measured on {n1} and {n2}/mailbox ({t1:.1f} s, {t2:.1f} s: {k * 1000 / 4:.1f} ms "
                            f"per message, the mailboxes one after the other), extrapolated to {n}/mailbox: "
                            f"{bwall:.0f} s")
                out.append(f"(b)/(a) at {delay:g} ms: {bwall / best(a_runs):.1f}x (target: at least {target}x{note})")
            if a_runs:
                first = min(r["out"]["first_call_seconds"] for r in a_runs)
                per = min((r["out"]["last_call_seconds"] - r["out"]["first_call_seconds"]) / (r["messages"] - 1)
                          for r in a_runs)
                out.append(f"(a) at {delay:g} ms: the first host call comes {first:.2f} s after the start (TLS, "
                           f"login, listing), then one message every {per * 1000:.2f} ms")
        a_small, a_d = pick("a", proto, args.small, args.delay_ms), pick("a", proto, n, args.delay_ms)
        c_small, c_d = pick("c", proto, args.small, args.delay_ms), pick("c", proto, n, args.delay_ms)
        if a_small and a_d:
            out.append(f"round trips per mailbox (turns / waits), {args.small} -> {n} messages: "
                       f"(a) {rt_text(a_small)} -> {rt_text(a_d)}, (c) {rt_text(c_small)} -> {rt_text(c_d)}")
        m = args.memory_count
        every, small_only = pick("m", proto, m, 0), pick("s", proto, m, 0)
        if every and small_only:
            # The same statistic on both sides: the median peak of the runs.
            peak = median([r["rss_kb"] for r in every]) / 1024
            fixed = median([r["rss_kb"] for r in small_only]) / 1024
            big = max(os.path.getsize(f) for i in range(1, 5) for f in corpus_files(args.corpus, i, m))
            out.append(f"(a) peak RSS at {m}/mailbox, no delay (median of {len(every)} runs each): {peak:.1f} MB "
                       f"with every message (largest {big / 1e3:.0f} KB), {fixed:.1f} MB with the messages "
                       f"under 64 KiB only (PHP + extension + manager alone: {base_kb / 1024:.1f} MB); the "
                       f"large messages add {peak - fixed:.2f} MB, against 3x the largest message = "
                       f"{3 * big / 2**20:.2f} MB")
        lines.append("")
        lines.extend(f"- {x}" for x in out)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
