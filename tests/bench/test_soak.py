import argparse
import json

import pytest

from bench.soak import main, parse_rows, sample_times, soak, summarize


def _samples(rss: list[float], step_s: float = 60) -> list[dict]:
    return [{"t_s": i * step_s, "rss_mb": r} for i, r in enumerate(rss)]


def test_summary_growth_is_measured_from_the_end_of_warm_up():
    # start 100, warm-up ends at 2 min (200), then up to 212 and back to 206 at 6 min
    s = summarize(_samples([100, 180, 200, 205, 212, 208, 206]), warmup_s=120, duration_s=360)
    assert (s["rss_start_mb"], s["rss_warmup_end_mb"], s["rss_end_mb"], s["rss_max_after_warmup_mb"]) == \
        (100, 200, 206, 212)
    assert s["growth_end_pct"] == pytest.approx(3.0) and s["growth_max_pct"] == pytest.approx(6.0)
    # peaks of 1-minute windows (a quarter of the 4 minutes after warm-up): 205 at first, 208 last
    assert s["early_peak_mb"] == 205 and s["late_peak_mb"] == 208
    assert s["early_level_mb"] == 202.5 and s["late_level_mb"] == 207
    assert s["met"] and s["verdict"].startswith("growth after warm-up (last window vs the first): median 2.2 %, "
                                                "peak 1.5 %")
    leak = summarize(_samples([100, 200, 201, 210, 220, 230, 240]), warmup_s=60, duration_s=360)
    assert not leak["met"] and leak["verdict"].endswith("(target < 5 %): missed")
    swing = summarize(_samples([100, 200, 180, 210, 185, 212, 190, 208]), warmup_s=60, duration_s=420)
    assert swing["met"], swing  # swings, no trend
    # last half (t >= 180 s): 205, 212, 208, 206 -> a least-squares slope, per 10 minutes
    assert s["slope_last_half_mb_per_10min"] == pytest.approx(-1.0)
    flat = summarize(_samples([100, 150, 150, 151, 150]), warmup_s=60, duration_s=240)
    assert flat["met"] and flat["verdict"].endswith("(target < 5 %): met")
    assert flat["slope_last_half_mb_per_10min"] == pytest.approx(0, abs=1e-9)


def test_options_parse():
    assert parse_rows("1-8") == (1, 8) and parse_rows("4") == (4, 4)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rows("8-1")
    assert sample_times(30, 5, 10) == [0, 5, 10, 20, 30]


def test_short_soak_of_a_real_server(tiny_bundle):
    lines = []
    report = soak(tiny_bundle["models"], tiny_bundle["dev"], clients=4, minutes=0.1, warmup_minutes=0.03,
                  sample_s=1, server_settings={"intra_op_threads": 1}, log=lines.append)
    s, samples = report["summary"], report["samples"]
    assert len(samples) > 1 and all(x["rss_mb"] > 0 for x in samples)
    assert samples[0]["t_s"] < 0.5 and samples[0]["requests"] == 0  # taken before any load
    assert samples[-1]["t_s"] == pytest.approx(6, abs=1.5)
    assert s["ok"] and not s["server_died"] and s["unexpected_errors"] == {}
    assert s["requests"] > 20 and s["rows"] > 0 and s["p99_ms"] > 0
    # the mixed protocol sent intended refusals, and only those are in the errors
    kinds = {key.split(":")[0] for key in s["expected_refusals"]}
    assert kinds <= {"bad_input", "unknown_model"} and s["expected_refusals"]
    assert sum(s["errors"].values()) == sum(s["expected_refusals"].values())
    for key in ("rss_start_mb", "rss_warmup_end_mb", "rss_end_mb", "rss_max_after_warmup_mb", "growth_end_pct",
                "growth_max_pct", "slope_last_half_mb_per_10min", "metrics_bytes_end"):
        assert s[key] is not None, key
    assert any(x["metrics_bytes"] for x in samples)
    assert lines[-1] == s["verdict"] and s["verdict"].startswith("growth after warm-up (last window vs the first)")
    json.dumps(report)  # the report is JSON as it is


def test_cli_writes_json_and_plot(tiny_bundle, tmp_path, capsys):
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    rc = main(["--models", str(tiny_bundle["models"]), "--data", str(tiny_bundle["dev"]), "--clients", "2",
               "--minutes", "0.05", "--warmup-minutes", "0.01", "--sample-s", "1", "--protocol", "v2",
               "--rows-per-request", "2-3", "--threads", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["protocol"] == "v2" and report["summary"]["errors"] == {}
    assert report["summary"]["rows"] >= 2 * report["summary"]["requests"] > 0
    assert png.stat().st_size > 0
    assert "(target < 5 %): " in capsys.readouterr().out
