"""The fake (meta) kernels refuse what the real kernels refuse: a meta tensor mixed with real ones used to
reach them and return uninitialised memory, skip an update, or accept any shape."""

from __future__ import annotations

import pytest
import torch

from yaqa_ext import ops
from yaqa_ext.codebooks import e8p_abs_grid, trellis_table

META = torch.device("meta")


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to(META)


def ldlq_args(n: int = 8, m: int = 4) -> list:
    return [torch.randn(m, n), torch.eye(n), torch.eye(m), torch.ones(m, 1), torch.zeros(m, 1), 2, n, 2, 2]


def e8p_round_args() -> list:
    return [torch.randn(4, 16), torch.eye(16), torch.eye(4), torch.ones(4, 2), e8p_abs_grid(), 4, 2, 8]


def e8p_matmul_args() -> list:
    return [torch.randn(3, 16), torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16),
            e8p_abs_grid(), 2]


def trellis_round_args() -> list:
    return [torch.randn(16, 16), torch.eye(16), None, torch.ones(16, 1), trellis_table(6), 2, 16, 16]


def trellis_matmul_args() -> list:
    return [torch.randn(3, 16), torch.zeros(1, 66, dtype=torch.uint8), torch.ones(16, 1), trellis_table(12), 2]


# (op, arguments, index of the argument moved to the meta device)
MIXED = [
    (ops.ldlq_round_trellis, trellis_round_args, 0),
    (ops.ldlq_round_trellis, trellis_round_args, 4),
    (ops.trellis_matmul, trellis_matmul_args, 0),
    (ops.trellis_matmul, trellis_matmul_args, 1),
    (ops.ldlq_round_e8p, e8p_round_args, 0),
    (ops.ldlq_round_e8p, e8p_round_args, 3),
    (ops.ldlq_round_e8p, e8p_round_args, 4),
    (ops.e8p_matmul, e8p_matmul_args, 0),
    (ops.e8p_matmul, e8p_matmul_args, 1),
    (ops.e8p_matmul, e8p_matmul_args, 3),
    (ops.hadamard_transform, lambda: [torch.randn(3, 24), torch.ones(12, 12)], 1),
    (ops.ldlq_round, ldlq_args, 0),
    (ops.ldlq_round, ldlq_args, 1),
    (ops.ldlq_round, ldlq_args, 3),
    (ops.sketch_b_update, lambda: [torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.zeros(8, 8), torch.zeros(6, 6)], 0),
    (ops.sketch_b_update, lambda: [torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.zeros(8, 8), torch.zeros(6, 6)], 3),
    (ops.sketch_a_update, lambda: [torch.randn(4, 8), torch.randn(4, 6), torch.zeros(8, 8), torch.zeros(6, 6)], 1),
    (ops.input_moment_update, lambda: [torch.randn(4, 8), torch.zeros(8, 8)], 0),
]


@pytest.mark.parametrize("op, make, index", MIXED)
def test_meta_mixed_with_cpu_is_refused(op, make, index):
    args = make()
    args[index] = meta(args[index])
    with pytest.raises((RuntimeError, ValueError), match="is on"):
        op(*args)


@pytest.mark.parametrize(
    "op, args, match",
    [
        (ops.hadamard_transform, [meta(torch.randn(3, 24)), meta(torch.ones(0, 0))], "non-empty square"),
        (ops.hadamard_transform, [meta(torch.randn(3, 12)), None], "2\\^k"),
        (ops.ldlq_round, [meta(t) if isinstance(t, torch.Tensor) else t for t in ldlq_args()][:1]
         + [meta(torch.eye(4))] + [meta(t) if isinstance(t, torch.Tensor) else t for t in ldlq_args()][2:], "L_in must be 8 x 8"),
        (ops.ldlq_round, [meta(t) if isinstance(t, torch.Tensor) else t for t in ldlq_args()[:5]] + [9, 8, 2, 2], "bits"),
        (ops.sketch_b_update, [meta(torch.randn(2, 4, 8)), meta(torch.randn(2, 4, 6)), meta(torch.zeros(6, 6)),
                               meta(torch.zeros(6, 6))], "H_in must be 8 x 8"),
        (ops.sketch_a_update, [meta(torch.randn(4, 8)), meta(torch.randn(5, 6)), meta(torch.zeros(8, 8)), None],
         "must agree"),
        (ops.input_moment_update, [meta(torch.randn(4, 8)), meta(torch.zeros(7, 7))], "H must be 8 x 8"),
        (ops.block_ldl, [meta(torch.eye(8, dtype=torch.float16)), 4], "float32 or float64"),
    ],
)
def test_fake_kernels_repeat_the_shape_checks(op, args, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        op(*args)


def test_fake_kernels_accept_valid_meta_inputs():
    y = ops.hadamard_transform(meta(torch.randn(3, 24)), meta(torch.ones(12, 12)))
    assert y.device == META and y.shape == (3, 24)
    W_hat, codes = ops.ldlq_round(*[meta(t) if isinstance(t, torch.Tensor) else t for t in ldlq_args()])
    assert W_hat.shape == (4, 8) and codes.dtype == torch.uint8
