"""Load generator: concurrent clients, each sending one sentence per request, against a server.

    python -m bench.load --url http://127.0.0.1:8000 --data ../shared/data/glue/SST-2/dev.tsv
    python -m bench.load --compare-batching --model-dir models --data ... --json out.json

With --compare-batching it starts `offramp serve` itself twice on this machine, with dynamic
batching on and off (every request its own batch), and runs the same load against each in one
run, so the two figures are comparable. With --compare-thread-pool as well, four servers: each of
those with a thread pool per session and with one shared pool (OFFRAMP_SHARED_THREAD_POOL), all up
at once, the runs interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from training.data import read_examples


class Connection:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams: a load generator built on a
    full client library spends more CPU than the server it measures, on the same two cores."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def run_load(url: str, model: str | None, texts: list[str], clients: int, requests: int,
                   threshold: float | None, timeout_s: float = 60.0, expect_status: int = 200) -> dict:
    """`clients` concurrent connections, `requests` in all, one text per request, in file order.
    An answer other than `expect_status` counts as an error."""
    route = f"/v1/models/{model}/predict" if model else "/v1/predict"
    parsed = httpx.URL(url)
    bodies = [json.dumps({"inputs": [t], **({"threshold": threshold} if threshold is not None else {})}).encode()
              for t in texts]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    exit_layers: list[int] = []
    counter = iter(range(requests))

    async def client() -> None:
        connection = Connection(parsed.host, parsed.port)
        for i in counter:
            start = time.perf_counter()
            try:
                status, payload = await asyncio.wait_for(connection.post(route, bodies[i % len(bodies)]), timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                connection.close()
                continue
            latencies.append(time.perf_counter() - start)
            if status != expect_status:
                errors[str(status)] = errors.get(str(status), 0) + 1
            elif status == 200:
                exit_layers.extend(p["exit_layer"] for p in json.loads(payload)["predictions"])
        connection.close()

    warm = Connection(parsed.host, parsed.port)
    await warm.post(route, bodies[0])  # the model's first request is not timed
    warm.close()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": requests, "seconds": elapsed,
        "throughput_rps": requests / elapsed,
        "latency_ms": {q: float(np.percentile(ms, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
        if len(ms) else None,
        "errors": errors, "mean_exit_layer": float(np.mean(exit_layers)) if exit_layers else None,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, capture_output: bool = False, ready_timeout_s: float = 120,
                 **settings) -> tuple[subprocess.Popen, str]:
    """`offramp serve` on a free loopback port with OFFRAMP_<NAME> settings, once it is ready.
    With capture_output, its log is readable from proc.stdout."""
    port = _free_port()
    env = {**os.environ, "OFFRAMP_MODEL_DIR": str(model_dir),
           **{f"OFFRAMP_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
              for k, v in settings.items() if v is not None}}
    out = subprocess.PIPE if capture_output else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            log = proc.stdout.read() if capture_output else ""
            raise RuntimeError(f"server exited with {proc.returncode}\n{log}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready within {ready_timeout_s:g} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (it drains), then SIGKILL if it has not exited within timeout_s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server")
    p.add_argument("--compare-batching", action="store_true", help="start servers with batching on and off")
    p.add_argument("--compare-thread-pool", action="store_true",
                   help="with --compare-batching: each server also with one shared ONNX Runtime thread pool "
                        "(runs named *_shared_pool)")
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--model", help="model name (default: the server's default model)")
    p.add_argument("--data", type=Path, required=True, help="file of sentences (first text column)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threshold", type=float)
    p.add_argument("--threads", type=int, help="server intra-op threads")
    p.add_argument("--max-batch-rows", type=int, help="the batching server's OFFRAMP_MAX_BATCH_ROWS (default: its default)")
    p.add_argument("--repeats", type=int, default=1, help="with --compare-batching: interleaved runs, best kept")
    p.add_argument("--http-ceiling", action="store_true",
                   help="with --compare-batching: also the same load with an out-of-range threshold, which "
                        "the schema rejects (422) before the queue: what the HTTP layer alone can answer "
                        "on this machine, an upper bound for any batching")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    texts = [e.text for e in read_examples(args.data).examples]
    runs = {}
    if args.compare_batching:
        # Both servers up at once and the runs interleaved, best of --repeats each: on a busy
        # machine a disturbance then hits both settings alike.
        servers = {}
        try:
            pools = {"": False, "_shared_pool": True} if args.compare_thread_pool else {"": None}
            for suffix, shared in pools.items():
                for name, batching in (("batching", True), ("no_batching", False)):
                    servers[name + suffix] = start_server(
                        args.model_dir, batching=batching, intra_op_threads=args.threads, log_level="warning",
                        max_batch_rows=args.max_batch_rows if batching else None, shared_thread_pool=shared)
            trials = {name: [] for name in servers}
            for _ in range(args.repeats):
                for name, (_, url) in servers.items():
                    trials[name].append(asyncio.run(run_load(url, args.model, texts, args.clients,
                                                             args.requests, args.threshold)))
                if args.http_ceiling:
                    trials.setdefault("http_ceiling", []).append(asyncio.run(run_load(
                        servers["batching"][1], args.model, texts, args.clients, args.requests, 2.0,
                        expect_status=422)))
            runs = {name: max(t, key=lambda r: r["throughput_rps"]) for name, t in trials.items()}
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    elif args.compare_thread_pool:
        p.error("--compare-thread-pool needs --compare-batching")
    elif args.url:
        runs["server"] = asyncio.run(run_load(args.url, args.model, texts, args.clients, args.requests, args.threshold))
    else:
        p.error("give --url or --compare-batching")
    report = {"data": str(args.data), "clients": args.clients, "requests": args.requests, "repeats": args.repeats,
              "max_batch_rows": args.max_batch_rows,
              "threshold": args.threshold, "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "cores": os.cpu_count()}, "runs": runs}
    if "batching" in runs and "no_batching" in runs:
        report["batching_speedup"] = runs["batching"]["throughput_rps"] / runs["no_batching"]["throughput_rps"]
    if "batching_shared_pool" in runs:
        report["thread_pool"] = {"per_session": "batching, no_batching", "shared": "*_shared_pool"}
        report["batching_speedup_shared_pool"] = (runs["batching_shared_pool"]["throughput_rps"]
                                                  / runs["no_batching_shared_pool"]["throughput_rps"])
        report["shared_pool_vs_per_session"] = {
            name: runs[name + "_shared_pool"]["throughput_rps"] / runs[name]["throughput_rps"]
            for name in ("batching", "no_batching")}
    print(f"{'run':<23} | {'req/s':>8} | {'p50 ms':>7} | {'p95 ms':>7} | {'p99 ms':>7} | errors | mean exit")
    for name, r in runs.items():
        lat = r["latency_ms"] or {}
        print(f"{name:<23} | {r['throughput_rps']:8.1f} | {lat.get('p50', 0):7.1f} | {lat.get('p95', 0):7.1f} | "
              f"{lat.get('p99', 0):7.1f} | {sum(r['errors'].values()):6d} | {r['mean_exit_layer']}")
    if "http_ceiling" in runs and "no_batching" in runs:
        report["http_ceiling_vs_no_batching"] = runs["http_ceiling"]["throughput_rps"] / runs["no_batching"]["throughput_rps"]
    if "batching_speedup" in report:
        print(f"batching throughput / no batching: {report['batching_speedup']:.2f}x")
    if "shared_pool_vs_per_session" in report:
        print(f"shared pool: batching / no batching {report['batching_speedup_shared_pool']:.2f}x; shared / per "
              "session: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["shared_pool_vs_per_session"].items()))
    if "http_ceiling_vs_no_batching" in report:
        print(f"HTTP layer alone (422 before the queue) / no batching: {report['http_ceiling_vs_no_batching']:.2f}x: "
              f"batching cannot exceed this ratio on this machine")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
