"""Overload: does a real `offramp serve` keep completing accepted work when far more arrives than
it can take, and do its health and metrics routes keep answering meanwhile?

    python -m bench.overload                                 # 64 clients x 256 rows, 30 s a phase
    python -m bench.overload --text-chars 7700 --json overload-large.json

It starts the server itself (bench.load.start_server, a free loopback port, the server's default
settings unless --max-queue-rows, --threads or --max-body-bytes), then runs two phases with the
same kind of request (/v1 predict, --rows texts each, the model's default threshold):

  normal    --normal-clients (2) concurrent clients for --seconds: the server's normal
            throughput, with no 429 expected;
  overload  --clients (64) concurrent clients for --seconds. A client that gets 429 retries at
            once (the worst case), or after its Retry-After with --honour-retry-after.

Texts are SST-2 sentences (--text-chars 0, the default), or with --text-chars N texts of exactly
N characters made by joining SST-2 sentences (the issue's large requests: 256 texts of 7,700
characters). A request body must fit the server's max body (OFFRAMP_MAX_BODY_BYTES, 2,000,000
by default): if it does not, the run stops before starting and says so (pass --max-body-bytes).

Through both phases (and 2 s of idle before them) a prober, in its own process so that the load
generator's event loop cannot delay it, sends GET /health/live, /health/ready and /metrics every
--probe-ms (50) on one keep-alive connection per route and records each latency.

Reported per phase: completed (200) requests/s and rows/s (answers that came back by the
phase's end; those in flight then are waited for and counted as late), p50/p99 latency of the
200s, 429 count and share of all answers, whether every 429 carried Retry-After, 429s refused
only after the body was read and parsed (their message says fewer rows were waiting than the
queue holds, so the check before parsing had let them through), any other status or transport
error (there must be none), server RSS (VmRSS of the process and children) at the end and
highest, the CPU of server and load generator (100 % = one core); probe p50/p99/max per route.
Then the ratio overload/normal of completed rows/s and two verdict lines:

  accepted work under overload: X.XXx of normal (target: close to 1)
  health/metrics under load: max Y ms (target < 100 ms): met|missed

Exit status: 0 whether the targets are met or not (this is a benchmark); 1 if the server died or
any answer other than 200 and 429 (or a transport error) came back; 2 for bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Connection, start_server, stop_server
from bench.soak import DEFAULT_DATA, LogTail, _fmt, percentiles, process_stats
from training.data import read_examples

PROBE_ROUTES = ("/health/live", "/health/ready", "/metrics")
PROBE_TARGET_MS = 100.0
IDLE_S = 2.0
BODY_POOL = 8  # distinct request bodies per phase, built before the run
QUEUE_FULL = re.compile(r"(\d+) rows waiting, at most (\d+)")


class Client(Connection):
    """bench.load's raw keep-alive connection, with GET and the response headers (Retry-After).
    The body is written apart from the head: no 2 MB copy per request."""

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write((head + "\r\n").encode())
        if body:
            self.writer.write(body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload


# -- request bodies ----------------------------------------------------------------------------
def long_texts(sentences: list[str], chars: int, count: int, rng: random.Random) -> list[str]:
    """`count` texts of exactly `chars` characters, each SST-2 sentences joined from a random start."""
    texts = []
    for _ in range(count):
        i, parts, n = rng.randrange(len(sentences)), [], 0
        while n < chars:
            parts.append(sentences[i % len(sentences)].strip())
            n += len(parts[-1]) + 1
            i += 1
        texts.append(" ".join(parts)[:chars])
    return texts


def request_bodies(sentences: list[str], rows: int, text_chars: int, pool: int = BODY_POOL,
                   seed: int = 0) -> list[bytes]:
    """`pool` /v1 bodies of `rows` texts: SST-2 sentences (text_chars 0) or texts of text_chars."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(pool):
        texts = (long_texts(sentences, text_chars, rows, rng) if text_chars > 0
                 else [rng.choice(sentences) for _ in range(rows)])
        bodies.append(json.dumps({"inputs": texts}, ensure_ascii=False).encode())
    return bodies


# -- the prober, in its own process ------------------------------------------------------------
def probe_process(host: str, port: int, interval_s: float, timeout_s: float, ready, stop, out) -> None:
    """Every interval_s, each route on its own keep-alive connection, until `stop` is set; then
    puts [(route, start (time.monotonic, shared by processes), latency s or None, status)].
    `ready` is set once it runs."""
    samples: list[tuple] = []

    async def probe(route: str) -> None:
        conn = Client(host, port)
        next_at = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status, _, _ = await asyncio.wait_for(conn.request("GET", route), timeout_s)
                samples.append((route, t0, time.monotonic() - t0, str(status)))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                conn.close()
                samples.append((route, t0, None, type(exc).__name__))
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - interval_s)  # after a slow probe: no burst
        conn.close()

    async def main() -> None:
        ready.set()
        await asyncio.gather(*(probe(route) for route in PROBE_ROUTES))

    asyncio.run(main())
    out.put(samples)


def probe_summary(samples: list[tuple], start: float, end: float, target_ms: float = PROBE_TARGET_MS) -> dict:
    """Per route: probes started in [start, end), p50/p99/max ms, failures, and the slow ones
    (over target_ms) with their time in seconds from `start`."""
    routes = {}
    for route in PROBE_ROUTES:
        mine = [s for s in samples if s[0] == route and start <= s[1] < end]
        ok = [s[2] for s in mine if s[2] is not None and s[3] == "200"]
        p50, p99 = percentiles(ok)
        slow = [{"t_s": round(s[1] - start, 3), "ms": round(s[2] * 1000, 1)}
                for s in mine if s[2] is not None and s[2] * 1000 >= target_ms]
        routes[route] = {"probes": len(mine), "p50_ms": p50, "p99_ms": p99,
                         "max_ms": max(ok) * 1000 if ok else None,
                         "failed": dict(Counter(s[3] for s in mine if s[3] != "200")), "slow": slow}
    return routes


# -- one phase of load -------------------------------------------------------------------------
@dataclass
class Tally:
    issued: int = 0
    ok: int = 0  # 200 by the phase's end
    late: int = 0  # 200 after it (in flight at the end)
    rejected: int = 0  # 429
    rejected_after_parse: int = 0  # 429 refused after the body was parsed (not at admission)
    retry_after_missing: int = 0
    other: Counter = field(default_factory=Counter)  # every other status, and transport errors
    latencies_s: list[float] = field(default_factory=list)  # of the 200s by the end


async def run_phase(proc, host: str, port: int, route: str, bodies: list[bytes], rows: int, clients: int,
                    seconds: float, honour_retry_after: bool, timeout_s: float, max_requests: int) -> dict:
    """`clients` connections sending bodies for `seconds` (and at most max_requests); then waits
    for the requests in flight. Server RSS and CPU sampled every second."""
    tally = Tally()
    start = time.monotonic()
    deadline = start + seconds
    stats0, gen0 = process_stats(proc.pid), time.process_time()
    rss = [stats0["rss_mb"]] if stats0 else []

    async def client(i: int) -> None:
        conn = Client(host, port)
        k = i
        try:
            while time.monotonic() < deadline and tally.issued < max_requests:
                tally.issued += 1
                body = bodies[k % len(bodies)]
                k += 1
                t0 = time.monotonic()
                try:
                    status, headers, payload = await asyncio.wait_for(conn.request("POST", route, body), timeout_s)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    conn.close()
                    tally.other[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)  # no tight loop against a server that is gone
                    continue
                t1 = time.monotonic()
                if status == 200:
                    if t1 <= deadline:
                        tally.ok += 1
                        tally.latencies_s.append(t1 - t0)
                    else:
                        tally.late += 1
                elif status == 429:
                    tally.rejected += 1
                    # The server's admission before the body says "no room for up to N more"; a
                    # refusal after parsing (room reserved for the real rows) does not.
                    message = payload.decode("utf-8", "replace")
                    if QUEUE_FULL.search(message) and "no room for up to" not in message:
                        tally.rejected_after_parse += 1
                    retry_after = headers.get("retry-after")
                    if retry_after is None:
                        tally.retry_after_missing += 1
                    elif honour_retry_after:
                        try:
                            wait = float(retry_after)
                        except ValueError:
                            wait = 1.0
                        await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
                else:
                    tally.other[str(status)] += 1
        finally:
            conn.close()

    async def sampler() -> None:
        while True:
            await asyncio.sleep(1.0)
            s = process_stats(proc.pid) if proc.poll() is None else None
            if s:
                rss.append(s["rss_mb"])

    sampling = asyncio.create_task(sampler())
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.wait(tasks, timeout=seconds + timeout_s + 10)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ended = time.monotonic()
    sampling.cancel()
    stats1, gen1 = process_stats(proc.pid) if proc.poll() is None else None, time.process_time()
    if stats1:
        rss.append(stats1["rss_mb"])
    answers = tally.ok + tally.late + tally.rejected + sum(v for k, v in tally.other.items() if k.isdigit())
    p50, p99 = percentiles(tally.latencies_s)
    return {
        "clients": clients, "seconds": seconds, "start": start, "end": ended, "drain_s": ended - deadline,
        "requests_issued": tally.issued, "max_requests_reached": tally.issued >= max_requests,
        "completed": tally.ok, "completed_late": tally.late,
        "completed_per_s": tally.ok / seconds, "rows_per_s": tally.ok * rows / seconds,
        "p50_ms": p50, "p99_ms": p99,
        "rejected_429": tally.rejected, "share_429": tally.rejected / answers if answers else 0.0,
        "rejected_429_after_parse": tally.rejected_after_parse,
        "retry_after_missing": tally.retry_after_missing,
        "every_429_had_retry_after": tally.retry_after_missing == 0,
        "other_statuses": dict(tally.other),
        "rss_end_mb": rss[-1] if rss else None, "rss_max_mb": max(rss) if rss else None,
        "server_cpu_pct": (stats1["cpu_s"] - stats0["cpu_s"]) / (ended - start) * 100 if stats0 and stats1 else None,
        "client_cpu_pct": (gen1 - gen0) / (ended - start) * 100,
        "server_died": proc.poll() is not None,
    }


async def warm_up(host: str, port: int, route: str, body: bytes, timeout_s: float) -> None:
    conn = Client(host, port)
    try:
        for _ in range(2):  # the model's first requests are not timed
            status, _, payload = await asyncio.wait_for(conn.request("POST", route, body), timeout_s)
            if status != 200:
                raise RuntimeError(f"warm-up request answered {status}: {payload[:300]!r}")
    finally:
        conn.close()


# -- the benchmark -----------------------------------------------------------------------------
def server_max_body(settings: dict) -> int:
    if settings.get("max_body_bytes") is not None:
        return int(settings["max_body_bytes"])
    from app.settings import Settings

    return Settings.model_fields["max_body_bytes"].default if "OFFRAMP_MAX_BODY_BYTES" not in os.environ \
        else int(os.environ["OFFRAMP_MAX_BODY_BYTES"])


def overload(models: Path, data: Path | list[str], clients: int = 64, rows: int = 256, seconds: float = 30,
             normal_clients: int = 2, normal_seconds: float | None = None, text_chars: int = 0,
             honour_retry_after: bool = False, model: str | None = None, probe_ms: float = 50,
             timeout_s: float = 120, max_requests: int | None = None, seed: int = 0,
             server_settings: dict | None = None, log=print) -> dict:
    """Start a server on `models`, run the normal and overload phases with the prober, stop it;
    the report (see the module docstring). `data`: a file of sentences or the sentences;
    `max_requests` per phase defaults to 5,000 a second of the phase."""
    if clients < 1 or normal_clients < 1 or rows < 1 or seconds <= 0 or text_chars < 0 or probe_ms <= 0:
        raise ValueError("need clients, normal clients and rows >= 1, seconds > 0, text chars >= 0, probe ms > 0")
    normal_seconds = seconds if normal_seconds is None else normal_seconds
    sentences = data if isinstance(data, list) else [e.text for e in read_examples(data).examples]
    settings = {"log_level": "warning", **{k: v for k, v in (server_settings or {}).items() if v is not None}}
    bodies = request_bodies(sentences, rows, text_chars, seed=seed)
    body_bytes, limit = max(len(b) for b in bodies), server_max_body(settings)
    if body_bytes > limit:
        raise ValueError(f"request bodies are up to {body_bytes:,} bytes, over the server's max body of "
                         f"{limit:,} bytes: pass --max-body-bytes (OFFRAMP_MAX_BODY_BYTES) of at least {body_bytes}")
    route = f"/v1/models/{model}/predict" if model else "/v1/predict"
    load_at_start = os.getloadavg()[0]
    proc, url = start_server(Path(models), capture_output=True, ready_timeout_s=300, **settings)
    tail = LogTail(proc.stdout)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_process, args=(host, port, probe_ms / 1000, timeout_s, ready, stop, out),
                         daemon=True)
    phases: dict[str, dict] = {}
    samples: list[tuple] = []
    try:
        asyncio.run(warm_up(host, port, route, bodies[0], timeout_s))
        prober.start()
        if not ready.wait(60):
            raise RuntimeError("the prober process did not start")
        idle_start = time.monotonic()
        time.sleep(IDLE_S)
        phases["idle"] = {"start": idle_start, "end": time.monotonic()}
        for name, n, secs in (("normal", normal_clients, normal_seconds), ("overload", clients, seconds)):
            if log:
                log(f"{name}: {n} clients x {rows} rows for {secs:g} s ...")
            phases[name] = asyncio.run(run_phase(
                proc, host, port, route, bodies, rows, n, secs, honour_retry_after, timeout_s,
                max_requests if max_requests is not None else int(5000 * secs)))
            if phases[name]["server_died"]:
                break
            time.sleep(1.0)  # a pause between phases: the queue is empty when the next begins
    finally:
        stop.set()
        if prober.pid is not None:
            try:
                samples = out.get(timeout=30)
            except Exception:
                samples = []
            prober.join(timeout=10)
            if prober.is_alive():
                prober.kill()
        died = proc.poll()
        stop_server(proc)
        tail.thread.join(timeout=5)
    for phase in phases.values():
        phase["probes"] = probe_summary(samples, phase["start"], phase["end"])
    report = {
        "config": {"models": str(models), "data": None if isinstance(data, list) else str(data),
                   "route": route, "clients": clients, "rows": rows, "seconds": seconds,
                   "normal_clients": normal_clients, "normal_seconds": normal_seconds, "text_chars": text_chars,
                   "body_bytes": body_bytes, "server_max_body_bytes": limit,
                   "honour_retry_after": honour_retry_after, "probe_ms": probe_ms, "timeout_s": timeout_s,
                   "seed": seed, "server_settings": settings,
                   # what the server also took from this environment (e.g. OFFRAMP_OVERLOAD_HOLD_MS)
                   "server_environment": {k: v for k, v in os.environ.items() if k.startswith("OFFRAMP_")}},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_start": load_at_start},
        "phases": phases, "summary": summarize(phases, died),
        "server_log_tail": tail.text() if died is not None else None,
    }
    if log:
        print_report(report, log)
    return report


def summarize(phases: dict, died: int | None) -> dict:
    normal, over = phases.get("normal"), phases.get("overload")
    ratio = (over["rows_per_s"] / normal["rows_per_s"]
             if normal and over and normal["rows_per_s"] else None)
    worst = None  # (ms, phase, route)
    for name in ("normal", "overload"):
        for route, p in (phases.get(name) or {}).get("probes", {}).items():
            if p["max_ms"] is not None and (worst is None or p["max_ms"] > worst[0]):
                worst = (p["max_ms"], name, route)
    probe_failures = {f"{name}:{route}": p["failed"] for name in ("normal", "overload")
                      for route, p in (phases.get(name) or {}).get("probes", {}).items() if p["failed"]}
    met = worst is not None and worst[0] < PROBE_TARGET_MS and not probe_failures
    other = {f"{name}:{k}": v for name in ("normal", "overload") for k, v in
             (phases.get(name) or {}).get("other_statuses", {}).items()}
    return {
        "ratio_rows_per_s": ratio,
        "probe_max_ms": worst and worst[0], "probe_max_at": worst and f"{worst[1]} {worst[2]}",
        "probe_failures": probe_failures, "probe_target_met": met,
        "other_statuses": other, "server_died": died is not None, "server_returncode": died,
        "ok": died is None and not other and over is not None,
        "verdict_accepted": f"accepted work under overload: {_fmt(ratio, '.2f')}x of normal (target: close to 1)",
        "verdict_probes": (f"health/metrics under load: max {_fmt(worst and worst[0], '.0f')} ms "
                           f"(target < {PROBE_TARGET_MS:g} ms): {'met' if met else 'missed'}"),
    }


def print_report(report: dict, log=print) -> None:
    c, phases, s = report["config"], report["phases"], report["summary"]
    texts = f"texts of {c['text_chars']} characters" if c["text_chars"] else "SST-2 sentences"
    log(f"{c['rows']} {texts} a request ({c['body_bytes']:,} bytes, server max body {c['server_max_body_bytes']:,}); "
        f"429: {'retry after Retry-After' if c['honour_retry_after'] else 'retry at once'}")
    log(f"{'phase':<8} | {'clients':>7} | {'req/s':>6} | {'rows/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'429':>6} | {'429 %':>5} | {'after parse':>11} | {'Retry-After':>11} | {'other':>5} | "
        f"{'RSS MB':>6} | {'max MB':>6} | {'srv CPU%':>8} | {'gen CPU%':>8}")
    for name in ("normal", "overload"):
        p = phases.get(name)
        if not p:
            continue
        log(f"{name:<8} | {p['clients']:7d} | {p['completed_per_s']:6.2f} | {p['rows_per_s']:7.1f} | "
            f"{_fmt(p['p50_ms'], '7.0f')} | {_fmt(p['p99_ms'], '7.0f')} | {p['rejected_429']:6d} | "
            f"{p['share_429'] * 100:5.1f} | {p['rejected_429_after_parse']:11d} | "
            f"{('all' if p['every_429_had_retry_after'] else str(p['retry_after_missing']) + ' lack'):>11} | "
            f"{sum(p['other_statuses'].values()):5d} | {_fmt(p['rss_end_mb'], '6.0f')} | "
            f"{_fmt(p['rss_max_mb'], '6.0f')} | {_fmt(p['server_cpu_pct'], '8.0f')} | "
            f"{_fmt(p['client_cpu_pct'], '8.0f')}")
    log(f"{'probes':<8} | {'route':<13} | {'n':>4} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | "
        f"{'>=100 ms':>8} | failed")
    for name in ("idle", "normal", "overload"):
        for route, p in (phases.get(name) or {}).get("probes", {}).items():
            log(f"{name:<8} | {route:<13} | {p['probes']:4d} | {_fmt(p['p50_ms'], '7.1f')} | "
                f"{_fmt(p['p99_ms'], '7.1f')} | {_fmt(p['max_ms'], '7.1f')} | {len(p['slow']):8d} | "
                f"{p['failed'] or '-'}")
    for name in ("normal", "overload"):
        p = phases.get(name)
        if p and (p["completed_late"] or p["max_requests_reached"]):
            log(f"{name}: {p['completed_late']} requests answered after the phase's end (drain {p['drain_s']:.1f} s)"
                + ("; request budget reached" if p["max_requests_reached"] else ""))
    if s["other_statuses"]:
        log(f"OTHER ANSWERS: {s['other_statuses']}")
    if s["server_died"]:
        log(f"SERVER DIED (exit status {s['server_returncode']}); its log ends:\n{report['server_log_tail']}")
    if s["probe_max_at"]:
        log(f"slowest probe: {s['probe_max_at']}")
    log(s["verdict_accepted"])
    log(s["verdict_probes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"), help="model folder to serve (default: models/)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="file of sentences (default: SST-2 dev)")
    p.add_argument("--model", help="model name (default: the server's default model, /v1/predict)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients in the overload phase")
    p.add_argument("--normal-clients", type=int, default=2, help="concurrent clients in the normal phase")
    p.add_argument("--rows", type=int, default=256, help="texts per request")
    p.add_argument("--seconds", type=float, default=30, help="length of each phase")
    p.add_argument("--normal-seconds", type=float, help="length of the normal phase (default: --seconds)")
    p.add_argument("--text-chars", type=int, default=0,
                   help="0: SST-2 sentences; N: texts of N characters joined from them (e.g. 7700)")
    p.add_argument("--honour-retry-after", action="store_true", help="after a 429, wait its Retry-After")
    p.add_argument("--probe-ms", type=float, default=50, help="interval of each health/metrics probe")
    p.add_argument("--timeout-s", type=float, default=120, help="per request")
    p.add_argument("--max-requests", type=int, help="per phase (default: 5,000 a second)")
    p.add_argument("--max-queue-rows", type=int, help="server OFFRAMP_MAX_QUEUE_ROWS (default: its default)")
    p.add_argument("--threads", type=int, help="server intra-op threads (default: the server's)")
    p.add_argument("--max-body-bytes", type=int, help="server OFFRAMP_MAX_BODY_BYTES (default: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:
        report = overload(args.models, args.data, args.clients, args.rows, args.seconds, args.normal_clients,
                          args.normal_seconds, args.text_chars, args.honour_retry_after, args.model, args.probe_ms,
                          args.timeout_s, args.max_requests, args.seed,
                          {"max_queue_rows": args.max_queue_rows, "intra_op_threads": args.threads,
                           "max_body_bytes": args.max_body_bytes})
    except (ValueError, RuntimeError) as exc:
        print(f"python -m bench.overload: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
