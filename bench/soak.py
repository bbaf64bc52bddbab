"""Soak: a long run of a real `offramp serve` under steady load, watching its memory.

    python -m bench.soak                          # 30 minutes, 64 clients, models/, SST-2 dev
    python -m bench.soak --minutes 2 --warmup-minutes 0.5 --clients 16 --json soak.json --plot soak.png

It starts the server itself (bench.load.start_server, a free loopback port), keeps --clients
concurrent keep-alive connections busy for --minutes (and at most --max-requests requests), and
every --sample-s seconds records the server's resident memory (VmRSS from /proc of the process
and of any children), requests completed, errors by status, p50/p99 latency of the window's
answered (200) requests, the size of /metrics, and the CPU time of the server and of this
load generator. The verdict compares the highest RSS after warm-up with RSS at the end of
warm-up: growth must stay under --target-pct (5 %).

--protocol mixed (the default) sends /v1 predict (default and named routes) and /v2 infer with
thresholds spread over 0..1 (some left to the model's default), some with return_probabilities
or a subset of /v2 outputs, and a small share of requests that must be refused: bad input (422
on /v1, 400 for a body that is not JSON and on /v2) and unknown model names, a new random one
each time (404; they must not grow memory or /metrics). --protocol v1 or v2 sends only plain
valid requests of that protocol at the model's default threshold.

The load generator is bench.load's raw keep-alive connections (--client raw): on a 2-core
machine it takes ~3 % of a core where httpx.AsyncClient (--client httpx) took ~22 % and left
the server 25 % fewer requests a second (16 clients, 0.4-minute runs), so one process drives
the load; the report gives both CPU figures so a run can tell.

Exit status: 0 whether the target is met or not (this is a benchmark); 1 if the server died or
any answer other than the intended refusals came back (another status, or a transport error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.load import Connection, start_server, stop_server
from training.data import read_examples

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
TARGET_PCT = 5.0
# Share of each request kind in --protocol mixed.
MIX = (("v1", 0.45), ("v2", 0.45), ("bad_input", 0.05), ("unknown_model", 0.05))
V2_OUTPUTS = ("label", "label_id", "probabilities", "exit_layer", "uncertainty")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the server process, from /proc ------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """pid and every process below it (children of children too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def process_stats(pid: int) -> dict | None:
    """VmRSS (MB) and threads of the process and its descendants, and their CPU seconds;
    None once the process is gone."""
    rss_kb, children_kb, threads, cpu_ticks, alive = 0, 0, 0, 0, 0
    pids = descendants(pid)
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{p}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "VmRSS" not in status:  # a zombie
            continue
        alive += 1
        kb = int(status["VmRSS"].split()[0])
        rss_kb += kb
        if p != pid:
            children_kb += kb
        threads += int(status["Threads"])
        cpu_ticks += int(stat[11]) + int(stat[12])  # utime, stime (fields 14, 15)
    if not alive:
        return None
    return {"rss_mb": rss_kb / 1024, "rss_children_mb": children_kb / 1024, "processes": alive,
            "threads": threads, "cpu_s": cpu_ticks / CLK_TCK}


# -- requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    kind: str
    path: str
    body: bytes
    expect: int
    rows: int = 0  # sentences in a request meant to be answered


@dataclass
class Target:
    """What the server serves: the model names, and whether each takes text pairs."""
    default: str
    pair: dict[str, bool]


def random_name(rng: random.Random) -> str:
    return f"soak-missing-{rng.getrandbits(48):012x}"


def pick_rows(rng: random.Random, texts: list[str], rows: tuple[int, int], pair: bool) -> list:
    n = rng.randint(*rows)
    chosen = [rng.choice(texts) for _ in range(n)]
    return [[t, rng.choice(texts)] for t in chosen] if pair else chosen


def v1_call(rng: random.Random, texts, rows, target: Target, varied: bool, model: str | None = None,
            expect: int = 200, kind: str = "v1") -> Call:
    name = model or rng.choice(sorted(target.pair))
    body: dict = {"inputs": pick_rows(rng, texts, rows, target.pair.get(name, False))}
    if varied:
        if rng.random() < 0.8:
            body["threshold"] = round(rng.random(), 3)
        if rng.random() < 0.1:
            body["return_probabilities"] = True
    path = "/v1/predict" if model is None and name == target.default and rng.random() < 0.5 \
        else f"/v1/models/{name}/predict"
    return Call(kind, path, json.dumps(body).encode(), expect, len(body["inputs"]) if expect == 200 else 0)


def v2_body(rng: random.Random, texts, rows, pair: bool, varied: bool) -> dict:
    chosen = pick_rows(rng, texts, rows, pair)
    first = [r[0] for r in chosen] if pair else chosen
    inputs = [{"name": "text", "shape": [len(first)], "datatype": "BYTES", "data": first}]
    if pair:
        inputs.append({"name": "text_pair", "shape": [len(chosen)], "datatype": "BYTES",
                       "data": [r[1] for r in chosen]})
    body: dict = {"id": f"{rng.getrandbits(32):08x}", "inputs": inputs}
    if varied:
        if rng.random() < 0.8:
            body["parameters"] = {"threshold": round(rng.random(), 3)}
        if rng.random() < 0.2:
            body["outputs"] = [{"name": n} for n in rng.sample(V2_OUTPUTS, rng.randint(1, len(V2_OUTPUTS)))]
    return body


def v2_call(rng: random.Random, texts, rows, target: Target, varied: bool) -> Call:
    name = rng.choice(sorted(target.pair))
    body = v2_body(rng, texts, rows, target.pair[name], varied)
    return Call("v2", f"/v2/models/{name}/infer", json.dumps(body).encode(), 200, body["inputs"][0]["shape"][0])


def bad_call(rng: random.Random, texts, rows, target: Target) -> Call:
    """A request the server must refuse: 422 on /v1 (the schema; 400 for a body that is not
    JSON), 400 on /v2."""
    name = target.default
    v1, v2 = f"/v1/models/{name}/predict", f"/v2/models/{name}/infer"
    good = json.loads(v1_call(rng, texts, rows, target, False, model=name).body)
    v2good = v2_body(rng, texts, rows, target.pair[name], False)
    choice = rng.randrange(7)
    if choice == 0:
        return Call("bad_input", v1, json.dumps({**good, "threshold": 1 + rng.random() + 1e-3}).encode(), 422)
    if choice == 1:
        return Call("bad_input", v1, b'{"inputs": []}', 422)
    if choice == 2:
        return Call("bad_input", v1, json.dumps(good).encode()[:-2], 400)  # truncated JSON: 400, not 422
    if choice == 3:
        return Call("bad_input", v1, json.dumps({**good, "thresh": 0.5}).encode(), 422)  # unknown field
    if choice == 4:
        v2good["inputs"][0]["datatype"] = "FP32"
        return Call("bad_input", v2, json.dumps(v2good).encode(), 400)
    if choice == 5:
        v2good["inputs"][0]["shape"] = [len(v2good["inputs"][0]["data"]) + 1]
        return Call("bad_input", v2, json.dumps(v2good).encode(), 400)
    return Call("bad_input", v2, json.dumps(v2good).encode()[:-2], 400)


def unknown_call(rng: random.Random, texts, rows, target: Target) -> Call:
    """A valid request for a model that does not exist, a new name every time: 404."""
    name = random_name(rng)
    if rng.random() < 0.5:
        body = {"inputs": pick_rows(rng, texts, rows, False)}
        return Call("unknown_model", f"/v1/models/{name}/predict", json.dumps(body).encode(), 404)
    body = v2_body(rng, texts, rows, False, False)
    return Call("unknown_model", f"/v2/models/{name}/infer", json.dumps(body).encode(), 404)


def make_call(rng: random.Random, texts: list[str], rows: tuple[int, int], target: Target, protocol: str) -> Call:
    if protocol == "v1":
        return v1_call(rng, texts, rows, target, False)
    if protocol == "v2":
        return v2_call(rng, texts, rows, target, False)
    kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    if kind == "v1":
        return v1_call(rng, texts, rows, target, True)
    if kind == "v2":
        return v2_call(rng, texts, rows, target, True)
    if kind == "bad_input":
        return bad_call(rng, texts, rows, target)
    return unknown_call(rng, texts, rows, target)


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Window:
    """What happened between two samples."""
    requests: int = 0
    rows: int = 0
    statuses: Counter = field(default_factory=Counter)  # every answer other than 200, and transport errors
    unexpected: Counter = field(default_factory=Counter)  # "kind:status" of answers not the intended one
    expected_refusals: Counter = field(default_factory=Counter)  # "kind:status" of the intended refusals
    latencies_s: list[float] = field(default_factory=list)  # of the 200 answers


def percentiles(latencies_s: list[float]) -> tuple[float | None, float | None]:
    if not latencies_s:
        return None, None
    ms = np.asarray(latencies_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def sample_times(duration_s: float, warmup_s: float, sample_s: float) -> list[float]:
    """Every sample_s from 0, plus the end of warm-up and the end."""
    times = {round(k * sample_s, 6) for k in range(int(duration_s / sample_s) + 1)}
    return sorted(times | {warmup_s, duration_s})


def summarize(samples: list[dict], warmup_s: float, duration_s: float, target_pct: float = TARGET_PCT) -> dict:
    """RSS at start / end of warm-up / end, growth after warm-up and the slope over the last
    half, and the verdict on peaks (below)."""
    rss = [s for s in samples if s.get("rss_mb") is not None]
    if not rss:
        return {"rss_start_mb": None, "verdict": "no RSS sample", "met": False}
    start = rss[0]
    at_warmup = min(rss, key=lambda s: (abs(s["t_s"] - warmup_s), s["t_s"]))
    after = [s for s in rss if s["t_s"] > at_warmup["t_s"]]
    end = rss[-1]
    base = at_warmup["rss_mb"]
    top = max((s["rss_mb"] for s in after), default=base)
    half = [s for s in rss if s["t_s"] >= duration_s / 2]
    slope = None
    if len(half) >= 2 and half[-1]["t_s"] > half[0]["t_s"]:
        slope = float(np.polyfit([s["t_s"] for s in half], [s["rss_mb"] for s in half], 1)[0]) * 600
    growth_end = (end["rss_mb"] / base - 1) * 100
    growth_max = (top / base - 1) * 100
    # RSS that is given back to the system swings from sample to sample; against one sample
    # (the end of warm-up, perhaps a trough) a swing reads as growth. The verdict compares the
    # last window with the first after warm-up (a window: a quarter of the time after warm-up,
    # at most 5 minutes), by their medians (the level) and their peaks: both under target.
    span = end["t_s"] - at_warmup["t_s"]
    window = min(span / 4, 300.0)
    early = [s["rss_mb"] for s in rss if at_warmup["t_s"] <= s["t_s"] <= at_warmup["t_s"] + window]
    late = [s["rss_mb"] for s in rss if s["t_s"] >= end["t_s"] - window]
    early_peak, late_peak = max(early, default=base), max(late, default=end["rss_mb"])
    growth_peak = (late_peak / early_peak - 1) * 100
    early_level = float(np.median(early)) if early else base
    late_level = float(np.median(late)) if late else end["rss_mb"]
    growth_level = (late_level / early_level - 1) * 100
    met = growth_level < target_pct and growth_peak < target_pct
    return {
        "rss_start_mb": start["rss_mb"], "rss_warmup_end_mb": base, "rss_end_mb": end["rss_mb"],
        "rss_max_after_warmup_mb": top, "warmup_end_t_s": at_warmup["t_s"],
        "growth_end_pct": growth_end, "growth_max_pct": growth_max,
        "peak_window_s": window, "early_peak_mb": early_peak, "late_peak_mb": late_peak,
        "growth_peak_pct": growth_peak, "early_level_mb": early_level, "late_level_mb": late_level,
        "growth_level_pct": growth_level,
        "slope_last_half_mb_per_10min": slope, "target_pct": target_pct, "met": met,
        "verdict": f"growth after warm-up (last window vs the first): median {growth_level:.1f} %, "
                   f"peak {growth_peak:.1f} % (target < {target_pct:g} %): {'met' if met else 'missed'}",
    }


class LogTail:
    """The last lines of the server's log, read on a thread so its pipe never fills."""

    def __init__(self, stream, lines: int = 40):
        self.lines: deque[str] = deque(maxlen=lines)
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        digits = spec.lstrip("+").split(".")[0]
        return "-".rjust(int(digits) if digits.isdigit() else 0)
    return format(value, spec)


HEADER = (f"{'minute':>7} | {'RSS MB':>7} | {'req/s':>7} | {'rows/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'errors':>6} | {'unexp.':>6} | {'/metrics KB':>11} | {'srv CPU%':>8} | {'gen CPU%':>8}")


def format_sample(s: dict, warmup_s: float) -> str:
    mark = "*" if s["t_s"] <= warmup_s else " "
    return (f"{s['minute']:6.2f}{mark} | {_fmt(s['rss_mb'], '7.1f')} | {_fmt(s['req_per_s'], '7.1f')} | "
            f"{_fmt(s['rows_per_s'], '7.1f')} | {_fmt(s['p50_ms'], '7.1f')} | {_fmt(s['p99_ms'], '7.1f')} | "
            f"{sum(s['errors'].values()):6d} | {sum(s['unexpected'].values()):6d} | "
            f"{_fmt(None if s['metrics_bytes'] is None else s['metrics_bytes'] / 1024, '11.1f')} | "
            f"{_fmt(s['server_cpu_pct'], '8.0f')} | {_fmt(s['client_cpu_pct'], '8.0f')}")


# -- the soak ----------------------------------------------------------------------------------
async def _soak(proc, url: str, texts: list[str], clients: int, duration_s: float, warmup_s: float,
                sample_s: float, rows: tuple[int, int], protocol: str, seed: int, max_requests: int,
                timeout_s: float, client_kind: str, log) -> dict:
    parsed = httpx.URL(url)
    async with httpx.AsyncClient(base_url=url, timeout=30) as admin:
        listing = (await admin.get("/v1/models")).json()["models"]
    target = Target(default=next(m["name"] for m in listing if m["default"]),
                    pair={m["name"]: m["text_pair"] for m in listing})
    state = {"window": Window(), "issued": 0, "stop": False, "died": None}
    all_latencies: list[float] = []
    totals = Window()
    start = time.monotonic()
    deadline = start + duration_s

    def record(call: Call, status: str, latency_s: float | None) -> None:
        w = state["window"]
        w.requests += 1
        if status == "200" and call.expect == 200:
            w.rows += call.rows
            w.latencies_s.append(latency_s)
        if status != "200":
            w.statuses[status] += 1
        key = f"{call.kind}:{status}"
        if status == str(call.expect):
            if call.expect != 200:
                w.expected_refusals[key] += 1
        else:
            w.unexpected[key] += 1

    async def raw_client(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        conn = Connection(parsed.host, parsed.port)
        try:
            while not state["stop"] and time.monotonic() < deadline and state["issued"] < max_requests:
                state["issued"] += 1
                call = make_call(rng, texts, rows, target, protocol)
                t0 = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.post(call.path, call.body), timeout_s)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    conn.close()
                    record(call, type(exc).__name__, None)
                    await asyncio.sleep(0.05)  # no tight loop against a server that is gone
                    continue
                record(call, str(status), time.perf_counter() - t0)
        finally:
            conn.close()

    async def httpx_client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        headers = {"content-type": "application/json"}
        while not state["stop"] and time.monotonic() < deadline and state["issued"] < max_requests:
            state["issued"] += 1
            call = make_call(rng, texts, rows, target, protocol)
            t0 = time.perf_counter()
            try:
                r = await http.post(call.path, content=call.body, headers=headers)
            except httpx.HTTPError as exc:
                record(call, type(exc).__name__, None)
                await asyncio.sleep(0.05)
                continue
            record(call, str(r.status_code), time.perf_counter() - t0)

    samples: list[dict] = []
    pid = proc.pid

    async def sampler(http: httpx.AsyncClient) -> None:
        last_t, last_srv, last_gen = None, None, None
        for at in sample_times(duration_s, warmup_s, sample_s):
            delay = start + at - time.monotonic()
            if delay > 0 and not clients_done.is_set():
                try:  # a last sample at once if the clients stop first (request budget spent)
                    await asyncio.wait_for(clients_done.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            now = time.monotonic()
            stats = process_stats(pid) if proc.poll() is None else None
            gen_cpu = time.process_time()
            w, state["window"] = state["window"], Window()
            metrics_bytes = None
            if stats is not None:
                try:
                    metrics_bytes = len((await http.get("/metrics", timeout=timeout_s)).content)
                except httpx.HTTPError:
                    pass
            t = now - start
            dt = None if last_t is None else t - last_t
            p50, p99 = percentiles(w.latencies_s)
            s = {"t_s": t, "minute": t / 60, "warmup": t <= warmup_s + 1e-6,
                 "rss_mb": stats and stats["rss_mb"], "rss_children_mb": stats and stats["rss_children_mb"],
                 "processes": stats and stats["processes"], "threads": stats and stats["threads"],
                 "requests": w.requests, "rows": w.rows,
                 "req_per_s": w.requests / dt if dt else None, "rows_per_s": w.rows / dt if dt else None,
                 "p50_ms": p50, "p99_ms": p99, "errors": dict(w.statuses), "unexpected": dict(w.unexpected),
                 "expected_refusals": dict(w.expected_refusals), "metrics_bytes": metrics_bytes,
                 "server_cpu_s": stats and stats["cpu_s"], "client_cpu_s": gen_cpu,
                 "server_cpu_pct": (stats["cpu_s"] - last_srv) / dt * 100 if dt and stats and last_srv is not None else None,
                 "client_cpu_pct": (gen_cpu - last_gen) / dt * 100 if dt else None}
            samples.append(s)
            all_latencies.extend(w.latencies_s)
            totals.requests += w.requests
            totals.rows += w.rows
            totals.statuses.update(w.statuses)
            totals.unexpected.update(w.unexpected)
            totals.expected_refusals.update(w.expected_refusals)
            if log:
                log(format_sample(s, warmup_s))
            last_t, last_srv, last_gen = t, stats and stats["cpu_s"], gen_cpu
            if stats is None:
                state["died"] = proc.poll()
                break
            started.set()
            if clients_done.is_set():
                break
        state["stop"] = True
        started.set()

    tasks: list[asyncio.Task] = []
    started, clients_done = asyncio.Event(), asyncio.Event()

    async def drive() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        clients_done.set()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http, \
            httpx.AsyncClient(base_url=url) as metrics_http:
        if log:
            log(HEADER)
        sampling = asyncio.create_task(sampler(metrics_http))
        await started.wait()  # the sample at t=0 is taken before any request
        tasks.extend(asyncio.create_task(raw_client(i) if client_kind == "raw" else httpx_client(i, http))
                     for i in range(clients))
        driving = asyncio.create_task(drive())
        await sampling
        state["stop"] = True
        done, pending = await asyncio.wait(tasks, timeout=timeout_s + 5)
        for t in pending:
            t.cancel()
        await asyncio.wait([driving], timeout=5)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    # Requests that ended after the last sample (in flight at the deadline) still count.
    late = state["window"]
    totals.requests += late.requests
    totals.rows += late.rows
    totals.statuses.update(late.statuses)
    totals.unexpected.update(late.unexpected)
    totals.expected_refusals.update(late.expected_refusals)
    elapsed = time.monotonic() - start
    p50, p99 = percentiles(all_latencies)
    return {"samples": samples, "died": state["died"], "elapsed_s": elapsed,
            "totals": {"requests": totals.requests, "rows": totals.rows,
                       "req_per_s": totals.requests / elapsed, "rows_per_s": totals.rows / elapsed,
                       "p50_ms": p50, "p99_ms": p99, "errors": dict(totals.statuses),
                       "unexpected_errors": dict(totals.unexpected),
                       "expected_refusals": dict(totals.expected_refusals)}}


def parse_rows(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition("-")
    try:
        rows = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not N or LO-HI") from None
    if not 1 <= rows[0] <= rows[1]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= LO <= HI")
    return rows


def soak(models: Path, data: Path | list[str], clients: int = 64, minutes: float = 30, warmup_minutes: float = 2,
         sample_s: float = 10, rows_per_request: tuple[int, int] = (1, 8), protocol: str = "mixed",
         seed: int = 0, max_requests: int | None = None, timeout_s: float = 60, client: str = "raw",
         target_pct: float = TARGET_PCT, server_settings: dict | None = None, log=print) -> dict:
    """Start a server on `models`, soak it, stop it; the report (see the module docstring).
    `data` is a file of sentences or the sentences; `max_requests` defaults to 1,000 a second."""
    if protocol not in ("v1", "v2", "mixed"):
        raise ValueError(f"protocol {protocol!r}: v1, v2 or mixed")
    if client not in ("raw", "httpx"):
        raise ValueError(f"client {client!r}: raw or httpx")
    if not 0 <= warmup_minutes < minutes:
        raise ValueError("need 0 <= warm-up < minutes")
    if sample_s <= 0 or clients < 1:
        raise ValueError("need sample_s > 0 and clients >= 1")
    texts = data if isinstance(data, list) else [e.text for e in read_examples(data).examples]
    duration_s, warmup_s = minutes * 60, warmup_minutes * 60
    max_requests = max_requests if max_requests is not None else max(1000, int(duration_s * 1000))
    settings = {"log_level": "warning", **(server_settings or {})}
    load_at_start = os.getloadavg()[0]
    proc, url = start_server(Path(models), capture_output=True, ready_timeout_s=300, **settings)
    tail = LogTail(proc.stdout)
    try:
        run = asyncio.run(_soak(proc, url, texts, clients, duration_s, warmup_s, sample_s, rows_per_request,
                                protocol, seed, max_requests, timeout_s, client, log))
    finally:
        stop_server(proc)
        tail.thread.join(timeout=5)
    samples = run["samples"]
    summary = summarize(samples, warmup_s, duration_s, target_pct)
    totals = run["totals"]
    gen = [s["client_cpu_pct"] for s in samples if s["client_cpu_pct"] is not None]
    srv = [s["server_cpu_pct"] for s in samples if s["server_cpu_pct"] is not None]
    metrics = [s["metrics_bytes"] for s in samples if s["metrics_bytes"] is not None]
    summary.update({
        "server_died": run["died"] is not None, "server_returncode": run["died"],
        "samples": len(samples), "elapsed_s": run["elapsed_s"], **totals,
        "metrics_bytes_start": metrics[0] if metrics else None, "metrics_bytes_end": metrics[-1] if metrics else None,
        "server_cpu_pct_mean": float(np.mean(srv)) if srv else None,
        "client_cpu_pct_mean": float(np.mean(gen)) if gen else None,
    })
    summary["ok"] = not summary["server_died"] and not totals["unexpected_errors"]
    report = {
        "config": {"models": str(models), "data": None if isinstance(data, list) else str(data),
                   "clients": clients, "minutes": minutes, "warmup_minutes": warmup_minutes, "sample_s": sample_s,
                   "rows_per_request": list(rows_per_request), "protocol": protocol, "seed": seed,
                   "max_requests": max_requests, "timeout_s": timeout_s, "client": client,
                   "server_settings": settings},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_start": load_at_start},
        "samples": samples, "summary": summary,
        "server_log_tail": tail.text() if summary["server_died"] else None,
    }
    if log:
        print_summary(report, log)
    return report


def print_summary(report: dict, log=print) -> None:
    s = report["summary"]
    log("(* = warm-up; latency of 200 answers; errors = every non-200 answer, unexp. = those not intended)")
    log(f"requests: {s['requests']} ({s['req_per_s']:.1f}/s, {s['rows_per_s']:.1f} rows/s), "
        f"p50 {_fmt(s['p50_ms'], '.1f')} ms, p99 {_fmt(s['p99_ms'], '.1f')} ms")
    log(f"intended refusals: {s['expected_refusals'] or 'none'}")
    log(f"unexpected errors: {s['unexpected_errors'] or 'none'}")
    if s.get("rss_start_mb") is not None:
        log(f"RSS: start {s['rss_start_mb']:.1f} MB, end of warm-up {s['rss_warmup_end_mb']:.1f} MB, "
            f"end {s['rss_end_mb']:.1f} MB, max after warm-up {s['rss_max_after_warmup_mb']:.1f} MB")
        log(f"against the end of warm-up: end {s['growth_end_pct']:+.1f} %, max {s['growth_max_pct']:+.1f} %; "
            f"slope over the last half: {_fmt(s['slope_last_half_mb_per_10min'], '+.2f')} MB per 10 min")
        log(f"{s['peak_window_s'] / 60:.1f}-minute windows, first after warm-up / last: median "
            f"{s['early_level_mb']:.1f} / {s['late_level_mb']:.1f} MB, peak {s['early_peak_mb']:.1f} / "
            f"{s['late_peak_mb']:.1f} MB")
    if s["metrics_bytes_start"] is not None:
        log(f"/metrics: {s['metrics_bytes_start']} bytes at start, {s['metrics_bytes_end']} at end")
    log(f"CPU (mean of windows, 100 % = one core): server {_fmt(s['server_cpu_pct_mean'], '.0f')} %, "
        f"load generator {_fmt(s['client_cpu_pct_mean'], '.0f')} %")
    if s["server_died"]:
        log(f"SERVER DIED (exit status {s['server_returncode']}); its log ends:\n{report['server_log_tail']}")
    log(s["verdict"])


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in report["samples"] if s["rss_mb"] is not None]
    s = report["summary"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(0, report["config"]["warmup_minutes"], color="0.85", label="warm-up")
    ax.plot([x["minute"] for x in samples], [x["rss_mb"] for x in samples], marker=".", label="server RSS")
    if s.get("rss_warmup_end_mb"):
        ax.axhline(s["rss_warmup_end_mb"] * (1 + s["target_pct"] / 100), color="tab:red", linestyle=":",
                   label=f"end of warm-up + {s['target_pct']:g} %")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS MB")
    metrics = [x for x in samples if x["metrics_bytes"] is not None]
    if metrics:
        ax2 = ax.twinx()
        ax2.plot([x["minute"] for x in metrics], [x["metrics_bytes"] / 1024 for x in metrics], color="tab:gray",
                 linestyle="--", label="/metrics KB")
        ax2.set_ylabel("/metrics KB")
        ax2.legend(loc="center right")
    c = report["config"]
    ax.set_title(f"soak: {c['clients']} clients, {c['protocol']}, {c['minutes']:g} min; {s.get('verdict', '')}",
                 fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"), help="model folder to serve (default: models/)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="file of sentences (default: SST-2 dev)")
    p.add_argument("--clients", type=int, default=64, help="concurrent connections")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup-minutes", type=float, default=2)
    p.add_argument("--sample-s", type=float, default=10, help="seconds between samples")
    p.add_argument("--rows-per-request", type=parse_rows, default=(1, 8), metavar="LO-HI",
                   help="each request sends a random number of sentences in this range (default 1-8)")
    p.add_argument("--protocol", choices=("v1", "v2", "mixed"), default="mixed")
    p.add_argument("--max-requests", type=int, help="stop after this many requests (default: 1,000 a second)")
    p.add_argument("--timeout-s", type=float, default=60, help="per request")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: bench.load's raw keep-alive connections (default; less CPU) or httpx")
    p.add_argument("--threads", type=int, help="server intra-op threads (default: the server's)")
    p.add_argument("--target-pct", type=float, default=TARGET_PCT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    try:
        report = soak(args.models, args.data, args.clients, args.minutes, args.warmup_minutes, args.sample_s,
                      args.rows_per_request, args.protocol, args.seed, args.max_requests, args.timeout_s,
                      args.client, args.target_pct, {"intra_op_threads": args.threads})
    except (ValueError, RuntimeError) as exc:
        print(f"python -m bench.soak: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
