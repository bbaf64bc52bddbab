from bench.load import main


def test_compare_batching_runs_both_servers_without_errors(tiny_bundle, tmp_path, capsys):
    import json

    out = tmp_path / "load.json"
    main(["--compare-batching", "--model-dir", str(tiny_bundle["models"]), "--data", str(tiny_bundle["dev"]),
          "--clients", "8", "--requests", "48", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    for name in ("batching", "no_batching"):
        run = report["runs"][name]
        assert run["errors"] == {} and run["requests"] == 48 and run["latency_ms"]["p99"] > 0
    assert report["batching_speedup"] > 0
    assert "batching throughput / no batching" in capsys.readouterr().out
