"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps."""

from __future__ import annotations

import time
from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAYER_BUCKETS = tuple(range(1, 25))
UNKNOWN_MODEL = "_unknown"


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """One model version's statistics in the shape of Triton's statistics extension
    (GET /v2/models/M/stats), plus the layers its rows exited at."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # rows per batch -> its computes
    exit_layers: Tally = field(default_factory=Tally)  # a generation model: its tokens, by decoder layer


class Metrics:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, int], ModelStats] = {}  # (model, version): loaded versions only
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("offramp_requests_total", "Requests by model, protocol and status",
                                ["model", "protocol", "status"], registry=r)
        self.request_duration = Histogram("offramp_request_duration_seconds", "Request time, end to end",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("offramp_queue_duration_seconds", "Time a request waited for its batch",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("offramp_inference_duration_seconds", "Engine time of a batch",
                                            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("offramp_batch_size_rows", "Rows per batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_rows = Gauge("offramp_queue_rows", "Rows waiting for a batch", ["model"], registry=r)
        self.exit_layer = Histogram("offramp_exit_layer", "Layer each row exited at", ["model"],
                                    buckets=LAYER_BUCKETS, registry=r)
        self.layers_executed = Counter("offramp_layers_executed_total", "Layers run, summed over rows",
                                       ["model"], registry=r)
        self.layers_saved = Counter("offramp_layers_saved_total",
                                    "Layers not run thanks to early exit, summed over rows", ["model"], registry=r)
        # Generation models (a batch's rows are texts, each of many tokens that leave one by one)
        self.generated_tokens = Counter("offramp_generated_tokens_total",
                                        "Decoding steps run: tokens generated, each final eos included", ["model"],
                                        registry=r)
        self.decoder_exit_layer = Histogram("offramp_decoder_exit_layer", "Decoder layer each decoding step exited at",
                                            ["model"], buckets=LAYER_BUCKETS, registry=r)
        self.default_threshold = Gauge("offramp_default_threshold",
                                       "Threshold of requests that set none, as the latency controller holds it",
                                       ["model"], registry=r)
        # The agreement monitor (OFFRAMP_AUDIT_FRACTION, app/audit.py)
        self.audit_rows = Counter("offramp_audit_rows_total", "Served rows checked against full depth",
                                  ["model"], registry=r)
        self.audit_agreed = Counter("offramp_audit_agreed_total",
                                    "Checked rows whose served answer was full depth's", ["model"], registry=r)
        self.audit_agreement = Gauge("offramp_audit_agreement", "Agreed / checked rows so far", ["model"], registry=r)
        self.audit_expected = Gauge("offramp_audit_expected_agreement",
                                    "The agreement the calibration table expects at the checked rows' settings",
                                    ["model"], registry=r)
        self._audit_totals: dict[str, list[float]] = {}  # model -> [rows, agreed, expected sum, expected rows]

    def observe_audit(self, model: str, rows: int, agreed: int, expected_sum: float, expected_rows: int) -> None:
        totals = self._audit_totals.setdefault(model, [0, 0, 0.0, 0])
        for i, value in enumerate((rows, agreed, expected_sum, expected_rows)):
            totals[i] += value
        self.audit_rows.labels(model).inc(rows)
        self.audit_agreed.labels(model).inc(agreed)
        self.audit_agreement.labels(model).set(totals[1] / totals[0])
        if totals[3]:
            self.audit_expected.labels(model).set(totals[2] / totals[3])

    def count_request(self, model: str, registry, protocol: str, status: int) -> None:
        """One request; a name that is no model (a typo, a scan) counts under UNKNOWN_MODEL, so
        clients cannot grow the label set (and the scrape) without bound."""
        label = model if registry.is_known(model) else UNKNOWN_MODEL
        self.requests.labels(label, protocol, str(status)).inc()

    def model_stats(self, model: str, version: int) -> ModelStats:
        return self.stats.setdefault((model, version), ModelStats())

    def observe_request(self, model: str, version: int, seconds: float, ok: bool) -> None:
        (self.model_stats(model, version).success if ok else self.model_stats(model, version).fail).add(seconds)
        if ok:
            self.request_duration.labels(model).observe(seconds)

    def observe_batch(self, model: str, version: int, num_layers: int, stats: BatchStats) -> None:
        record = self.model_stats(model, version)
        record.last_inference_ms = int(time.time() * 1000)
        record.inference_count += stats.rows
        record.execution_count += 1
        record.compute_infer.add(stats.inference_s)
        record.batches.setdefault(stats.rows, Duration()).add(stats.inference_s)
        for seconds in stats.queue_s:
            record.queue.add(seconds)
        record.exit_layers.update(stats.exit_layer.tolist())
        self.batch_size.labels(model).observe(stats.rows)
        self.inference_duration.labels(model).observe(stats.inference_s)
        for seconds in stats.queue_s:
            self.queue_duration.labels(model).observe(seconds)
        if stats.generated_tokens is not None:  # exit layers of tokens, not rows: families of their own
            self.generated_tokens.labels(model).inc(stats.generated_tokens)
            histogram = self.decoder_exit_layer.labels(model)
            for layer in stats.exit_layer.tolist():
                histogram.observe(layer)
            return
        for layer in stats.exit_layer.tolist():
            self.exit_layer.labels(model).observe(layer)
        executed = int(stats.exit_layer.sum())
        self.layers_executed.labels(model).inc(executed)
        self.layers_saved.labels(model).inc(stats.rows * num_layers - executed)
