from bench.load import main


def test_compare_batching_runs_both_servers_without_errors(tiny_bundle, tmp_path, capsys):
    import json

    out = tmp_path / "load.json"
    main(["--compare-batching", "--model-dir", str(tiny_bundle["models"]), "--data", str(tiny_bundle["dev"]),
          "--clients", "8", "--requests", "48", "--threads", "1", "--http-ceiling", "--json", str(out)])
    report = json.loads(out.read_text())
    for name in ("batching", "no_batching", "http_ceiling"):
        run = report["runs"][name]
        assert run["errors"] == {} and run["requests"] == 48 and run["latency_ms"]["p99"] > 0
    assert report["batching_speedup"] > 0
    assert report["runs"]["http_ceiling"]["mean_exit_layer"] is None  # every request stopped at the schema
    assert report["http_ceiling_vs_no_batching"] > 0
    printed = capsys.readouterr().out
    assert "batching throughput / no batching" in printed and "HTTP layer alone" in printed


def test_compare_thread_pool_runs_four_servers(tiny_bundle, tmp_path, capsys):
    import json

    out = tmp_path / "load.json"
    main(["--compare-batching", "--compare-thread-pool", "--model-dir", str(tiny_bundle["models"]),
          "--data", str(tiny_bundle["dev"]), "--clients", "4", "--requests", "24", "--threads", "1",
          "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"batching", "no_batching", "batching_shared_pool", "no_batching_shared_pool"}
    for run in report["runs"].values():
        assert run["errors"] == {} and run["requests"] == 24
    assert set(report["shared_pool_vs_per_session"]) == {"batching", "no_batching"}
    assert report["batching_speedup_shared_pool"] > 0
    assert "shared / per session" in capsys.readouterr().out


def test_compare_thread_pool_needs_compare_batching(tiny_bundle):
    import pytest

    with pytest.raises(SystemExit):
        main(["--compare-thread-pool", "--url", "http://127.0.0.1:9", "--data", str(tiny_bundle["dev"])])
