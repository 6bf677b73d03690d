"""`minigrok bench serve` on the tiny run: a few requests at each concurrency, every figure printed and written."""

import json

from minigrok.cli import main


def test_bench_serve_reports_each_concurrency(run, tmp_path, capsys):
    path = tmp_path / "serve.json"
    argv = ["bench", "serve", "--checkpoint", str(run), "--concurrency", "1,16", "--requests", "5"]
    assert main([*argv, "--max-tokens", "6", "--dtype", "fp32", "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 16]
    for level in result["levels"]:
        assert level["requests"] == 5 and 0 < level["ttft_p50_s"] <= level["latency_p50_s"] <= level["latency_p99_s"]
        assert level["requests_per_s"] > 0 and level["tokens_per_s"] > 0
    assert result["throughput_16_vs_1"] > 0 and "throughput_16_vs_1" in out and "ttft_p50_s" in out


def test_bench_serve_refuses_a_zero_count(capsys):
    assert main(["bench", "serve", "--config", "tiny", "--requests", "0"]) == 2
    assert "--requests 0" in capsys.readouterr().err
