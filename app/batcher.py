"""Dynamic batching: concurrent requests are merged into batches that each row leaves at its
own layer, with its own request's threshold and depth bounds.

One worker per model takes the oldest waiting row, fills the batch with the waiting rows of the
most similar length (bounded by rows and by padded tokens = rows x longest), runs it off the
event loop, and hands every request its rows back. The queue is bounded (QueueFull -> 429);
rows of a request whose client has gone or whose deadline has passed are dropped unrun.

A generation model's batcher takes GenerationJobs instead (one model, so one kind of job per
batcher): the same queue, budgets, deadlines and drain; its rows carry their request's decoding
parameters into engine.generate as per-row arrays, so requests of different parameters share a
batch. A generation row's cost for the token budget is its source tokens + max_new_tokens x
num_beams (what it can grow to), so the one budget (rows x costliest row) bounds both kinds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable

import numpy as np

from app.encoding import EncodedBatch
from app.engine import Engine, ExitResult
from app.threads import in_worker

log = logging.getLogger(__name__)


# A queued request's client is asked whether it is still there only once the request has waited
# this long (a few batches' compute): see Batcher._without_abandoned.
ASK_CLIENTS_AFTER_S = 0.1


class QueueFull(Exception):
    """More rows are waiting than the queue holds."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its rows were computed."""


class ShuttingDown(Exception):
    """The batcher no longer takes work."""


class Reservation:
    """Queue room held for a request from admission until its rows enter the queue, so that
    the expensive work in between (tokenising) is only done for
    requests that will run."""

    def __init__(self, batcher: Batcher, rows: int):
        self.batcher, self.rows = batcher, rows

    def release(self) -> None:
        self.batcher._reserved_rows -= self.rows
        self.rows = 0


@dataclass
class Job:
    batch: EncodedBatch  # this request's rows, tokenised
    threshold: float
    min_layers: int
    max_layers: int
    deadline: float | None = None
    policy: int = 0  # app/policies.py code; entropy
    patience: int = 0  # time.monotonic() after which the answer is useless
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    # filled as rows come back
    probabilities: np.ndarray | None = None
    exit_layer: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    remaining: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_rows: list[int] = field(default_factory=list)
    lengths: np.ndarray = field(init=False)  # tokens of each row, read by every batch choice

    def __post_init__(self) -> None:
        self.lengths = self.batch.lengths

    @property
    def rows(self) -> int:
        return int(self.batch.input_ids.shape[0])

    def result(self) -> ExitResult:
        return ExitResult(self.probabilities, self.exit_layer, self.uncertainty)


@dataclass
class GenerationJob:
    """A generate request's rows (app/generation.py SourceBatch) and its decoding parameters;
    its answer is a Generated per row. Same queue life as a Job (deadline, disconnect, drain)."""

    batch: Any  # SourceBatch (not imported: the batcher needs only its rows, lengths and gather)
    max_new_tokens: int
    num_beams: int
    threshold: float
    no_repeat_ngram_size: int
    deadline: float | None = None
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    outputs: list | None = None  # filled as rows come back
    remaining: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_rows: list[int] = field(default_factory=list)
    lengths: np.ndarray = field(init=False)  # each row's cost in the token budget (the module's docstring)

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.batch.lengths, dtype=np.int64) + self.max_new_tokens * self.num_beams

    @property
    def rows(self) -> int:
        return int(self.batch.rows)

    def result(self) -> list:
        return self.outputs


@dataclass
class BatchStats:
    """What the last batch looked like (for metrics)."""

    rows: int
    padded_tokens: int
    queue_s: list[float]  # of each request in the batch
    inference_s: float
    exit_layer: np.ndarray  # per row; of a generation batch, per generated token
    generated_tokens: int | None = None  # a generation batch's; None: a classification batch


class Batcher:
    def __init__(self, engine: Engine, max_batch_rows: int = 64, max_batch_tokens: int = 8192,
                 max_wait_ms: float = 2.0, max_queue_rows: int = 1024, merge_requests: bool = True,
                 on_batch: Callable[[BatchStats], None] | None = None, auditor=None):
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self.merge_requests = merge_requests  # False: every request is its own batch
        self.on_batch = on_batch
        self.auditor = auditor  # app/audit.py: sampled rows run again to full depth when idle
        self._pending: list[tuple[Job, int]] = []  # (job, row), oldest first
        self._reserved_rows = 0  # admitted, still being tokenised
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None

    @property
    def queued_rows(self) -> int:
        return len(self._pending) + self._reserved_rows

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Refuse new work, finish every queued row, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
            self._worker = None

    def check_room(self, rows: int) -> None:
        """QueueFull or ShuttingDown now, before anything is spent on a request of `rows` rows
        (a request larger than the whole queue is still taken when nothing waits)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        waiting = len(self._pending) + self._reserved_rows
        if waiting and waiting + rows > self.max_queue_rows:
            raise QueueFull(f"{waiting} rows waiting, at most {self.max_queue_rows}")

    def reserve(self, rows: int) -> Reservation:
        self.check_room(rows)
        self._reserved_rows += rows
        return Reservation(self, rows)

    async def submit(self, job: Job, reservation: Reservation | None = None) -> ExitResult:
        if reservation is None:
            self.check_room(job.rows)
        else:
            reservation.release()
            if self._closing:
                raise ShuttingDown("the server is shutting down")
        job.future = asyncio.get_running_loop().create_future()
        rows = job.rows
        if isinstance(job, GenerationJob):
            job.outputs = [None] * rows
        else:
            job.probabilities = np.zeros((rows, self.engine.output_width), dtype=np.float32)
            job.exit_layer = np.zeros(rows, dtype=np.int64)
            job.uncertainty = np.zeros(rows, dtype=np.float32)
        job.remaining = rows
        self._pending.extend((job, r) for r in range(rows))
        self._wakeup.set()
        return await job.future

    # -- the worker --------------------------------------------------------------------------
    async def _run(self) -> None:
        idle = True
        while True:
            if not self._pending and self.auditor is not None and self.auditor.pending and not self._closing:
                # Nothing is waiting: the monitor's rows run now, a batch at a time, so the next
                # request waits for at most one audit batch.
                try:
                    await in_worker(self.auditor.check, self.engine, self.auditor.take(self.max_batch_rows))
                except Exception:  # the monitor must never stop the serving
                    log.exception("audit batch failed")
                continue
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                idle = True
                continue
            if idle and self.merge_requests and not self._closing:
                # Only an idle worker waits (briefly) for company: rows that queued while the
                # previous batch ran go next at once, so the engine never idles on purpose.
                wait = self._pending[0][0].enqueued + self.max_wait_s - time.monotonic()
                if wait > 0 and len(self._pending) < self.max_batch_rows:
                    await asyncio.sleep(wait)
            idle = False
            chosen = await self._without_abandoned(self._choose())
            if chosen:
                await self._compute(chosen)

    async def _without_abandoned(self, chosen: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """The chosen rows less those of requests that gave up, expired or lost their client;
        those requests' other queued rows are dropped too. Checked just before computing, once
        per request and batch, so the cost does not grow with the queue."""
        now = time.monotonic()
        dropped = set()
        jobs = _unique(j for j, _ in chosen)
        # Asking a client yields to the event loop, which then runs its other ready work first:
        # asked one by one, a batch of 16 fresh requests waited ~13 ms here, as long as 2/3 of its
        # compute (docs/serving.md). So only requests queued long enough for their client to have
        # plausibly given up are asked, all at once; a fresh row costs less to compute than to ask.
        asked = [job for job in jobs if job.is_disconnected is not None and not job.future.done()
                 and now - job.enqueued >= ASK_CLIENTS_AFTER_S]
        gone = {}
        if asked:
            gone = dict(zip(map(id, asked), await asyncio.gather(*(job.is_disconnected() for job in asked))))
        for job in jobs:
            reason = None
            if job.future.done():  # the request gave up (its own timeout) while queued
                reason = "request cancelled"
            elif job.deadline is not None and now > job.deadline:
                reason = DeadlineExceeded("deadline passed while queued")
            elif gone.get(id(job)):
                reason = ConnectionAbortedError("client disconnected")
            if reason is not None:
                dropped.add(id(job))
                log.info("dropped %d queued rows: %s", job.rows, reason)
                if not job.future.done():
                    job.future.set_exception(reason)
        if dropped:
            self._pending = [(j, r) for j, r in self._pending if id(j) not in dropped]
        return [(j, r) for j, r in chosen if id(j) not in dropped]

    def _choose(self) -> list[tuple[Job, int]]:
        """The oldest row plus the waiting rows closest to it in length, within the budgets."""
        if not self._pending:
            return []
        first_job = self._pending[0][0]
        candidates = self._pending if self.merge_requests else [p for p in self._pending if p[0] is first_job]
        lengths = {id(p): int(p[0].lengths[p[1]]) for p in candidates}
        anchor = candidates[0]
        target = lengths[id(anchor)]
        by_closeness = sorted(candidates[1:], key=lambda p: abs(lengths[id(p)] - target))
        chosen, longest = [anchor], target
        for p in by_closeness:
            if len(chosen) >= self.max_batch_rows:
                break
            new_longest = max(longest, lengths[id(p)])
            if (len(chosen) + 1) * new_longest > self.max_batch_tokens:
                continue
            chosen.append(p)
            longest = new_longest
        picked = {id(p) for p in chosen}
        self._pending = [p for p in self._pending if id(p) not in picked]
        return chosen

    async def _compute(self, chosen: list[tuple[Job, int]]) -> None:
        if isinstance(chosen[0][0], GenerationJob):
            return await self._generate(chosen)
        batch = _merge(chosen)
        threshold = np.array([job.threshold for job, _ in chosen], dtype=np.float32)
        min_layers = np.array([job.min_layers for job, _ in chosen], dtype=np.int64)
        max_layers = np.array([job.max_layers for job, _ in chosen], dtype=np.int64)
        policy = np.array([job.policy for job, _ in chosen], dtype=np.int64)
        patience = np.array([job.patience for job, _ in chosen], dtype=np.int64)
        start = time.monotonic()
        try:
            result = await in_worker(self.engine.run, batch, threshold, min_layers, max_layers, policy, patience)
        except Exception as exc:  # a failed batch fails its requests, not the worker
            log.exception("batch of %d rows failed", len(chosen))
            for job in _unique(j for j, _ in chosen):
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        elapsed = time.monotonic() - start
        for i, (job, row) in enumerate(chosen):
            job.probabilities[row] = result.probabilities[i]
            job.exit_layer[row] = result.exit_layer[i]
            job.uncertainty[row] = result.uncertainty[i]
            job.remaining -= 1
        jobs = _settle(chosen, start, elapsed)
        if self.auditor is not None:
            self.auditor.sample(batch, result.probabilities, result.exit_layer, policy, threshold, patience)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(chosen), int(batch.input_ids.size),
                                     [start - job.enqueued for job in jobs], elapsed, result.exit_layer))


    async def _generate(self, chosen: list[tuple[GenerationJob, int]]) -> None:
        """A batch of generation rows: each row decodes with its own request's parameters."""
        batch = _merge(chosen)
        params = dict(
            max_new_tokens=np.array([job.max_new_tokens for job, _ in chosen], dtype=np.int64),
            num_beams=np.array([job.num_beams for job, _ in chosen], dtype=np.int64),
            threshold=np.array([job.threshold for job, _ in chosen], dtype=np.float32),
            no_repeat_ngram_size=np.array([job.no_repeat_ngram_size for job, _ in chosen], dtype=np.int64))
        start = time.monotonic()
        try:
            outputs = await in_worker(partial(self.engine.generate, batch, **params))
        except Exception as exc:  # a failed batch fails its requests, not the worker
            log.exception("generation batch of %d rows failed", len(chosen))
            for job in _unique(j for j, _ in chosen):
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        elapsed = time.monotonic() - start
        for output, (job, row) in zip(outputs, chosen):
            job.outputs[row] = output
            job.remaining -= 1
        jobs = _settle(chosen, start, elapsed)
        if self.on_batch is not None:
            layers = [layer for output in outputs for layer in output.exit_layers]
            self.on_batch(BatchStats(len(chosen), int(batch.input_ids.size), [start - job.enqueued for job in jobs],
                                     elapsed, np.asarray(layers, dtype=np.int64), generated_tokens=len(layers)))


def _settle(chosen: list, start: float, elapsed: float) -> list:
    """Every request of a computed batch: its timing, and its answer once all its rows are in."""
    jobs = _unique(job for job, _ in chosen)
    for job in jobs:
        job.queue_s = max(job.queue_s, start - job.enqueued)
        job.inference_s += elapsed
        job.batch_rows.append(len(chosen))
        if job.remaining == 0 and not job.future.done():
            job.future.set_result(job.result())
    return jobs


def _unique(jobs) -> list[Job]:
    return list({id(job): job for job in jobs}.values())


def _merge(chosen: list[tuple[Job, int]]) -> EncodedBatch:
    """One right-padded batch of the chosen rows of several requests (of one model, so all of
    one kind of batch: a cascade's carries every stage's tokens, a multi-task bundle's each row's
    task, so rows of different tasks share the batch; a generation model's is a SourceBatch)."""
    return type(chosen[0][0].batch).gather([(job.batch, row) for job, row in chosen])
