"""Timing helpers shared by the benchmarks: median wall time with device synchronisation."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from yaqa_ext.models import use_default_shared

use_default_shared()  # every benchmark reads the shared models and corpus: ../shared unless YAQA_SHARED is set


def median_seconds(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def benchmark_parser(doc: str | None, repeats: int = 5) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: --devices and --repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default, help="default: %(default)s")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per measurement (default: %(default)s)")
    return parser
