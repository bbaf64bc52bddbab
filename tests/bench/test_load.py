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
