"""SIGTERM during a burst: readiness goes false, every accepted request is answered, exit 0."""

import signal
import threading

import httpx

from tests.serving import start_server


def test_sigterm_drains_accepted_requests(tiny_bundle):
    proc, url = start_server(tiny_bundle["models"], max_batch_rows=4, max_wait_ms=5)
    texts = ["a long and winding sentence about a film that goes nowhere slowly"] * 64
    outcomes: list[object] = []
    started = threading.Barrier(17)

    def client():
        with httpx.Client(timeout=60) as http:
            http.get(url + "/health/live")  # connection accepted before the signal
            started.wait()
            try:
                outcomes.append(http.post(url + "/v1/models/tiny/predict",
                                          json={"inputs": texts, "threshold": 0}).status_code)
            except httpx.TransportError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    started.wait()
    threading.Event().wait(0.3)  # the burst is queued / computing
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    # uvicorn re-raises the signal once it has shut down gracefully: killed by SIGTERM, not crashed.
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert outcomes.count(200) == 16, (outcomes, log[-2000:])
    assert '"event": "predict"' in log  # structured request log lines
