import asyncio
import time

import numpy as np
import pytest

from app.batcher import ASK_CLIENTS_AFTER_S, Batcher, DeadlineExceeded, Job, QueueFull, ShuttingDown
from app.registry import load_model

TEXTS = ["a gripping , beautifully acted film", "dull", "the plot makes no sense at all , and the "
         "actors seem to know it", "charming", "not bad", "an utter waste of two hours"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load_model(tiny_bundle["bundle"], intra_op_threads=1)


def job(model, texts, threshold, min_layers=1, max_layers=3, **kw) -> Job:
    return Job(model.encoder.encode(texts), threshold, min_layers, max_layers, **kw)


def test_concurrent_requests_share_batches_and_get_their_own_answers(model):
    thresholds = [0.0, 1.0, 0.9995, 0.5, 1.0, 0.0]
    sizes = []

    async def main():
        batcher = Batcher(model.engine, max_batch_rows=64, max_wait_ms=50,
                          on_batch=lambda stats: sizes.append(stats.rows))
        batcher.start()
        jobs = [job(model, [t], thr) for t, thr in zip(TEXTS, thresholds)]
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(main())
    assert sum(sizes) == len(TEXTS) and max(sizes) > 1  # merged across requests
    for text, thr, result in zip(TEXTS, thresholds, results):
        alone = model.engine.run(model.encoder.encode([text]), thr)
        assert result.exit_layer.tolist() == alone.exit_layer.tolist()
        np.testing.assert_allclose(result.probabilities, alone.probabilities, atol=1e-5)
    assert results[0].exit_layer[0] == 3 and results[1].exit_layer[0] == 1


def test_budgets_bound_rows_and_padded_tokens(model):
    sizes, tokens = [], []

    def record(stats):
        sizes.append(stats.rows)
        tokens.append(stats.padded_tokens)

    async def main():
        batcher = Batcher(model.engine, max_batch_rows=4, max_batch_tokens=60, max_wait_ms=20, on_batch=record)
        batcher.start()
        await asyncio.gather(*(batcher.submit(job(model, [t], 0.0)) for t in TEXTS * 3))
        await batcher.stop()

    asyncio.run(main())
    assert sum(sizes) == 18 and max(sizes) <= 4 and max(tokens) <= 60


def test_without_merging_every_request_is_its_own_batch(model):
    sizes = []

    async def main():
        batcher = Batcher(model.engine, merge_requests=False, on_batch=lambda s: sizes.append(s.rows))
        batcher.start()
        await asyncio.gather(*(batcher.submit(job(model, TEXTS[:2], 0.0)) for _ in range(4)))
        await batcher.stop()

    asyncio.run(main())
    assert sizes == [2, 2, 2, 2]


def test_full_queue_refuses_at_once(model):
    async def main():
        batcher = Batcher(model.engine, max_queue_rows=3)  # not started: nothing drains
        waiting = asyncio.ensure_future(batcher.submit(job(model, TEXTS[:3], 0.0)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(job(model, TEXTS[:1], 0.0))
        batcher.start()
        await batcher.stop()
        return await waiting

    assert asyncio.run(main()).exit_layer.tolist() == [3, 3, 3]


def test_expired_cancelled_and_disconnected_requests_are_not_computed(model):
    computed = []

    async def gone():
        return True

    async def main():
        batcher = Batcher(model.engine, max_wait_ms=1, on_batch=lambda s: computed.append(s.rows))
        expired = job(model, ["a"], 0.0, deadline=time.monotonic() - 1)
        # queued long enough for its client to be asked (ASK_CLIENTS_AFTER_S)
        disconnected = job(model, ["b", "c"], 0.0, is_disconnected=gone, enqueued=time.monotonic() - 1)
        fine = job(model, ["d"], 0.0)
        tasks = [asyncio.ensure_future(batcher.submit(j)) for j in (expired, disconnected, fine)]
        cancelled = asyncio.ensure_future(batcher.submit(job(model, ["e", "f", "g"], 0.0)))
        await asyncio.sleep(0)
        cancelled.cancel()
        batcher.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert isinstance(results[0], DeadlineExceeded)
    assert isinstance(results[1], ConnectionAbortedError)
    assert results[2].exit_layer.tolist() == [3]
    assert computed == [1]  # only the one live row ran


def test_only_clients_of_requests_queued_a_while_are_asked(model):
    """Asking a client yields to the event loop; a fresh request is computed unasked, one queued
    longer than ASK_CLIENTS_AFTER_S is asked (and dropped if its client is gone)."""
    asked = []

    def client(name, there):
        async def is_disconnected():
            asked.append(name)
            return not there
        return is_disconnected

    async def main():
        batcher = Batcher(model.engine, max_wait_ms=1)
        old = time.monotonic() - 2 * ASK_CLIENTS_AFTER_S
        jobs = [job(model, ["a"], 0.0, is_disconnected=client("fresh, gone", False)),
                job(model, ["b"], 0.0, is_disconnected=client("old, there", True), enqueued=old),
                job(model, ["c"], 0.0, is_disconnected=client("old, gone", False), enqueued=old)]
        tasks = [asyncio.ensure_future(batcher.submit(j)) for j in jobs]
        batcher.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert sorted(asked) == ["old, gone", "old, there"]
    assert results[0].exit_layer.tolist() == results[1].exit_layer.tolist() == [3]
    assert isinstance(results[2], ConnectionAbortedError)


def test_stop_answers_everything_queued_then_refuses(model):
    async def main():
        batcher = Batcher(model.engine, max_wait_ms=1)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(job(model, [t], 0.5))) for t in TEXTS]
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(ShuttingDown):
            await batcher.submit(job(model, ["x"], 0.0))

    asyncio.run(main())
