"""The ``yaqa`` command line on the real default model."""

from __future__ import annotations

import re

from yaqa_ext.cli import main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_factors_every_linear_layer(shared, capsys):
    assert main(["demo", "--n-seqs", "2", "--seq-len", "64", "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"model\.layers\.\d+\.", line)]
    # stories260K: 5 decoder layers x (q, k, v, o, gate, up, down).
    assert len(rows) == 35
    for name, n, block, damp, err, _ms in rows:
        assert int(n) % int(block) == 0
        assert float(err) < 1e-5, f"{name}: LDL reconstruction error {err}"


def test_collect_command_writes_a_resumable_collection(shared, tmp_path, capsys):
    from yaqa_ext.hessians import load_hessians

    args = ["collect", "--out", str(tmp_path), "--n-seqs", "4", "--seq-len", "32", "--batch-size", "2",
            "--layers", "3-4", "--device", "cpu", "--sketch", "A", "--power-iters", "2"]
    assert main(args) == 0
    h = load_hessians(tmp_path)
    assert h.manifest["layers"] == [3, 4] and h.manifest["passes"] == ["input", "A_out", "A_in"]
    assert h.manifest["tokens"] == 128 and len(h.modules) == 14
    assert main(args) == 0  # the same command again: already complete, reused
    assert f"Hessian factors written to {tmp_path}" in capsys.readouterr().out
