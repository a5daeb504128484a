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
