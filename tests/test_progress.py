"""Progress off a terminal: whole lines (no carriage-return redraws) at most once per interval, in a
log of the CLI too."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from yaqa_ext.progress import progress_bar


def _log(monkeypatch, interval: str, steps: int) -> list[str]:
    log = io.StringIO()  # not a terminal: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv("YAQA_PROGRESS_INTERVAL", interval)
    with progress_bar(steps, "demo", "step") as bar:
        for _ in range(steps):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_every_update_is_a_line_at_interval_zero(monkeypatch):
    lines = _log(monkeypatch, "0", 4)
    assert [line.split("|")[0] for line in lines[:5]] == [f"demo: {p:3d}%" for p in (0, 25, 50, 75, 100)]
    assert all(f"{i}/4" in line for i, line in enumerate(lines[:5]))


def test_a_long_interval_gives_the_first_and_last_lines_only(monkeypatch):
    lines = _log(monkeypatch, "3600", 50)
    assert len(lines) == 2 and "0/50" in lines[0] and "50/50" in lines[1]


def test_disabled_bar_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(3, "demo", "step", enabled=False) as bar:
        bar.update(3)
    assert log.getvalue() == ""


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_bad_interval_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("YAQA_PROGRESS_INTERVAL", value)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with pytest.raises(ValueError, match="YAQA_PROGRESS_INTERVAL"):
        progress_bar(3, "demo", "step")


def test_cli_log_has_progress_lines(shared, tmp_path):
    env = {**os.environ, "YAQA_PROGRESS_INTERVAL": "0"}
    done = subprocess.run([sys.executable, "-m", "yaqa_ext.cli", "quantize", "--method", "rtn", "--bits", "4",
                           "--out", str(tmp_path / "q4")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("quantize rtn 4-bit")]
    assert "\r" not in done.stderr and lines and "100%" in lines[-1], done.stderr
