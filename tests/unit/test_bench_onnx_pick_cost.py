"""bench.onnx_pick_cost runs end to end on exported models (speed is not asserted here)."""

from __future__ import annotations

import re

import pytest

from bench import onnx_pick_cost


def test_pick_cost_bench_times_every_model_kind_and_judges_only_at_16_backends(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert onnx_pick_cost.main(["--backends", "4", "--picks", "300"]) == 0
    out = capsys.readouterr().out
    for kind in ("ridge", "mlp", "hgb"):
        # A model that failed to load would have returned 1 before any table.
        assert re.search(rf"\| onnx_latency \({kind}\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out)
        for regime in ("default", "rescore_s=0"):
            assert re.search(rf"\| onnx_latency \({kind}, {regime}\) \| [\d.]+ \| [\d.]+ \| "
                             r"- \(judged at 16 backends\) \|", out)
