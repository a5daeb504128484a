"""Shared fixtures: the devices to test on and the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import yaqa_ext

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CUDA_OK = torch.cuda.is_available() and yaqa_ext.WITH_CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every backend the op has: CPU always, CUDA when a GPU is present."""
    return request.param


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED
