"""The annotation server under a team's load: 20 annotators on 50,000 items, at the start and with
45,000 items done (a benchmark, not a timed test).

    python -m benchmarks.annotate_scale                      # 20 annotators, 50,000 items, 10 s a phase
    python -m benchmarks.annotate_scale --quick              # smoke test (4 annotators, 2,000 items, 2 s)

What it does: creates a database of `--items` choose-mode items (K=2) with the app's own `Store`,
starts `ppo-rlhf annotate serve --db DB --per-item 1` as a separate process (as a team would run
it), and lets `--annotators` client threads each loop GET /api/next -> POST /api/label (a random
choice) as fast as the server answers, for `--seconds`. Then it stops the server, marks
`--done` items answered by those annotators directly in the database (one transaction, the
counters recounted as a schema migration does) and measures again. Reported per phase: answers
acknowledged per second, and the p50 / p99 latency of every request (GET and POST alike), plus
the machine's load average (other work on the machine slows the server down).

Writes JSON and a markdown table to `--out` (default benchmarks/results/annotate-scale.*).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_db(path: Path, n_items: int) -> None:
    from ppo_rlhf.feedback.annotate.store import Store

    with Store.create(path, mode="choose", k=2, scale=7) as store:
        store.add_items((f"prompt {i}: write a short review of item {i}",
                         [f"response A to prompt {i}", f"response B to prompt {i}"])
                        for i in range(n_items))


def mark_done(path: Path, n_done: int, names: list[str]) -> None:
    """The first n_done items answered (per item 1) by `names` in turn, then the counters
    recounted from the rows (as the version-1 -> 2 migration computes them)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM reservations")
    done_now = {i for (i,) in db.execute("SELECT item_id FROM answers")}
    rows = [(i, names[i % len(names)], 0, "0", "[0, 1]", time.time())
            for i in range(1, n_done + 1) if i not in done_now]
    db.executemany("INSERT OR IGNORE INTO answers (item_id, annotator, skipped, value, shown, time) "
                   "VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.execute("UPDATE items SET answered = (SELECT COUNT(*) FROM answers a WHERE a.item_id = items.id "
               "AND NOT a.skipped)")
    db.execute("UPDATE items SET taken = answered")
    db.execute("DELETE FROM annotators")
    db.execute("INSERT INTO annotators SELECT annotator, SUM(NOT skipped), SUM(skipped), 0 FROM answers "
               "GROUP BY annotator")
    db.execute("UPDATE counters SET value = 0 WHERE key = 'per_item'")  # recounted at first use
    db.execute("COMMIT")
    db.close()


def start_server(db: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "ppo_rlhf", "annotate", "serve", "--db", str(db),
                             "--per-item", "1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "annotation page: http://" in line:
            return proc, int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read()}")


def annotator(port: int, name: str, stop: threading.Event, latencies: list[float],
              answers: list[float], errors: list[str]) -> None:
    rng = random.Random(name)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(method: str, path: str, body: dict | None = None) -> dict:
        nonlocal conn
        data = None if body is None else json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            raise
        latencies.append(time.perf_counter() - t0)
        if resp.status != 200:
            errors.append(f"{resp.status} {payload[:100]!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            return {}
        return json.loads(payload)

    while not stop.is_set():
        try:
            item = call("GET", f"/api/next?annotator={name}")
            if item.get("done"):
                return
            if "item_id" not in item:
                continue
            ok = call("POST", "/api/label", {"item_id": item["item_id"], "annotator": name,
                                             "choice": rng.choice([0, 1, "tie"])})
            if ok.get("ok"):
                answers.append(time.perf_counter())
        except (OSError, http.client.HTTPException) as e:
            errors.append(repr(e))


def phase(db: Path, names: list[str], seconds: float) -> dict:
    proc, port = start_server(db)
    try:
        # one warm-up request per annotator (the first request of each recounts nothing after a
        # restart with the same quota; after mark_done it recounts once)
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        warm.request("GET", f"/api/next?annotator={names[0]}")
        warm.getresponse().read()
        warm.close()
        stop = threading.Event()
        latencies: list[float] = []
        answers: list[float] = []
        errors: list[str] = []
        threads = [threading.Thread(target=annotator, args=(port, n, stop, latencies, answers, errors),
                                    daemon=True) for n in names]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(60)
        # the rate over the time answers came in (the items may run out before `seconds`)
        elapsed = (max(answers) if answers else time.perf_counter()) - t0
        load_after = os.getloadavg()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    with sqlite3.connect(db) as c:
        stored = c.execute("SELECT COUNT(*) FROM answers WHERE NOT skipped").fetchone()[0]
    return {"answers": len(answers), "seconds": round(elapsed, 2),
            "answers_per_s": round(len(answers) / elapsed, 1), "requests": len(lat),
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
            "max_ms": round(1000 * lat[-1], 1) if lat else None, "errors": len(errors),
            "first_errors": errors[:3], "stored_answers_after": stored,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in load_after]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--done", type=int, default=45_000, help="items done before the second phase")
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0,
                   help="length of each phase (at most; answers/s counts until the last answer)")
    p.add_argument("--quick", action="store_true", help="4 annotators, 2,000 items (1,800 done), 2 s")
    p.add_argument("--out", type=Path, default=HERE / "results" / "annotate-scale")
    args = p.parse_args()
    if args.quick:
        args.items, args.done, args.annotators, args.seconds = 2_000, 1_800, 4, 2.0
    names = [f"annotator{i:02d}" for i in range(args.annotators)]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "labels.sqlite"
        t0 = time.perf_counter()
        make_db(db, args.items)
        print(f"database of {args.items} items made in {time.perf_counter() - t0:.1f} s", flush=True)
        start = phase(db, names, args.seconds)
        print(f"start:        {json.dumps(start)}", flush=True)
        mark_done(db, args.done, names)
        late = phase(db, names, args.seconds)
        print(f"{args.done} done: {json.dumps(late)}", flush=True)
    result = {"command": " ".join(["python -m benchmarks.annotate_scale", *sys.argv[1:]]),
              "items": args.items, "done_before_second_phase": args.done,
              "annotators": args.annotators, "seconds_per_phase": args.seconds,
              "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "sqlite": sqlite3.sqlite_version, "phases": {"start": start, "late": late}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {label} | {r['answers_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | "
            f"{r['errors']} | {r['load_avg_before'][0]} / {r['load_avg_after'][0]} |"
            for label, r in (("start (0 done)", start), (f"{args.done:,} done", late))]
    md = "\n".join([
        f"# Annotation server: {args.annotators} annotators, {args.items:,} items",
        "", f"`{result['command']}` (up to {args.seconds:g} s per phase, {os.cpu_count()} CPUs, "
        f"SQLite {sqlite3.sqlite_version})", "",
        "| phase | answers/s | p50 ms | p99 ms | max ms | errors | load avg (1 min) before / after |",
        "|---|---|---|---|---|---|---|", *rows, ""])
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
