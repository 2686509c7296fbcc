"""The TTFT comparison tool (specreason_rt/serve/ttft.py) against a real server; no timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specreason_rt.pool import ReasonerPool
from specreason_rt.serve.app import create_app
from specreason_rt.serve.runner import ServerThread
from specreason_rt.serve.ttft import compare, main


def test_ttft_compare_streams_from_each_server_and_reports_medians(builtin_bundle: Path, tmp_path: Path,
                                                                   capsys) -> None:  # type: ignore[no-untyped-def]
    servers = [ServerThread(create_app(pool=ReasonerPool(builtin_bundle, workers=1))).start() for _ in range(2)]
    urls = [s.url for s in servers]
    try:
        body = {"model": "specreason", "messages": [{"role": "user", "content": "37+45*3"}], "max_tokens": 64,
                "strategy": "verifier"}
        report = compare(urls=[s.url for s in servers], body=body, repeats=3)
        assert [s["url"] for s in report["servers"]] == [s.url for s in servers]
        for row in report["servers"]:
            assert len(row["ttft_ms"]) == 3 and row["text_chunks_median"] >= 1
            assert 0 < row["ttft_share_of_total_median"] <= 1  # the first token arrives before the stream ends
            assert row["same_text_every_repeat"] and "Answer:" in row["text"]  # greedy verifier: one answer
        assert report["servers"][0]["ttft_ratio_to_first_median"] == 1.0
        out = tmp_path / "ttft.json"
        assert main(["--url", servers[0].url, "--prompt", "12+34", "--repeats", "1", "--field", 'strategy="verifier"',
                     "--out", str(out)]) == 0
        assert json.loads(out.read_text())["request"]["strategy"] == "verifier"
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["--url", servers[0].url, "--prompt", "1", "--field", "seed"])
        assert "write NAME=JSON" in capsys.readouterr().err
    finally:
        for s in servers:
            s.stop()
    assert main(["--url", urls[0], "--prompt", "12+34", "--repeats", "1"]) == 1  # stopped: one error line
    assert capsys.readouterr().err.startswith("error: ")
