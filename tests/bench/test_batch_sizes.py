"""bench.batch_sizes: engine throughput by batch size, in file order and in length order."""

from __future__ import annotations

import pytest

from bench import batch_sizes


@pytest.mark.parametrize("order", ["length", "input"])
def test_prints_a_row_per_threshold_and_a_cell_per_batch_size(tiny_bundle, tiny_data, capsys, order):
    batch_sizes.main([str(tiny_bundle["bundle"]), "--data", str(tiny_data[1]), "--rows", "16",
                      "--thresholds", "0,1", "--batch-sizes", "1,4", "--order", order])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"16 rows in {order} order"
    assert lines[1].startswith("threshold | batch 1 | batch 4")
    rows = [line.split("|") for line in lines[2:]]
    assert [float(r[0]) for r in rows] == [0.0, 1.0]
    assert all(float(cell) > 0 for r in rows for cell in r[1:])
