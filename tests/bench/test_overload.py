import json

from bench.overload import PROBE_ROUTES, long_texts, main, overload, probe_summary, request_bodies


def test_bodies_of_long_texts_have_exactly_the_characters_asked():
    import random

    sentences = ["a charming journey .", "unflinchingly bleak and desperate", "amélie ."]
    texts = long_texts(sentences, 500, 5, random.Random(0))
    assert len(texts) == 5 and all(len(t) == 500 for t in texts)
    body = json.loads(request_bodies(sentences, 3, 500, pool=2)[1])
    assert len(body["inputs"]) == 3 and all(len(t) == 500 for t in body["inputs"])
    short = json.loads(request_bodies(sentences, 4, 0, pool=1)[0])
    assert all(t in sentences for t in short["inputs"])


def test_probe_summary_keeps_each_route_and_window_apart():
    samples = [("/health/live", 10.0, 0.002, "200"), ("/health/live", 10.5, 0.150, "200"),
               ("/metrics", 10.2, None, "TimeoutError"), ("/health/ready", 12.0, 0.001, "200")]
    s = probe_summary(samples, 10.0, 11.0)
    assert set(s) == set(PROBE_ROUTES)
    assert s["/health/live"]["probes"] == 2 and s["/health/live"]["max_ms"] == 150.0
    assert s["/health/live"]["slow"] == [{"t_s": 0.5, "ms": 150.0}]
    assert s["/metrics"]["failed"] == {"TimeoutError": 1} and s["/metrics"]["max_ms"] is None
    assert s["/health/ready"]["probes"] == 0  # outside the window


def test_a_body_over_the_servers_limit_is_refused_before_any_server_starts(tmp_path, capsys):
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\nit 's a charming and often affecting journey . \t1\n")
    rc = main(["--models", str(tmp_path / "none"), "--data", str(data), "--rows", "256",
               "--text-chars", "7700", "--max-body-bytes", "1000000"])
    assert rc == 2 and "pass --max-body-bytes" in capsys.readouterr().err


def test_overload_of_a_real_server(tiny_bundle, tmp_path):
    lines = []
    # A small queue (two requests of 64 rows) so that 8 clients overload even the tiny model.
    report = overload(tiny_bundle["models"], tiny_bundle["dev"], clients=8, rows=64, seconds=3, normal_clients=1,
                      server_settings={"intra_op_threads": 1, "max_queue_rows": 128}, log=lines.append)
    phases, s = report["phases"], report["summary"]
    assert set(phases) == {"idle", "normal", "overload"}
    normal, over = phases["normal"], phases["overload"]
    for phase in (normal, over):
        assert phase["other_statuses"] == {}  # no 5xx, no transport error: only 200 and 429
        assert phase["rss_max_mb"] > 0 and phase["server_cpu_pct"] is not None
        assert set(phase["probes"]) == set(PROBE_ROUTES)
        for route, probe in phase["probes"].items():
            assert probe["probes"] > 10 and probe["failed"] == {} and probe["max_ms"] > 0, route
    assert normal["completed"] > 0 and normal["rejected_429"] == 0
    assert over["completed"] > 0 and over["rows_per_s"] > 0
    assert over["rejected_429"] > 0 and over["every_429_had_retry_after"]
    assert 0 < over["share_429"] < 1
    assert s["ok"] and not s["server_died"] and s["ratio_rows_per_s"] > 0
    assert lines[-2] == s["verdict_accepted"] and s["verdict_accepted"].startswith("accepted work under overload: ")
    assert lines[-1] == s["verdict_probes"] and "(target < 100 ms): " in s["verdict_probes"]
    json.dumps(report)  # the report is JSON as it is
