"""Progress bars: tqdm's on a terminal or in a notebook; in a log (stderr not a terminal) one plain line at most every
``$YAQA_PROGRESS_INTERVAL`` seconds (default 30) and one at the end, so batch jobs show where they are."""

from __future__ import annotations

import io
import os
import sys

from tqdm import tqdm
from tqdm.autonotebook import tqdm as auto_tqdm  # the notebook widget inside Jupyter, else tqdm

__all__ = ["progress_bar"]


class _Lines(io.TextIOBase):
    """A text stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _interval() -> float:
    value = os.environ.get("YAQA_PROGRESS_INTERVAL", "30")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"YAQA_PROGRESS_INTERVAL must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"YAQA_PROGRESS_INTERVAL must be >= 0 seconds, got {value!r}")
    return seconds


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A bar over ``total`` steps (``enabled=False``: a silent one); lines instead of redraws off a terminal."""
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if auto_tqdm is not tqdm or sys.stderr.isatty():
        return auto_tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(sys.stderr), mininterval=_interval(),
                ncols=100, ascii=True)
