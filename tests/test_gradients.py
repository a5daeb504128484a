"""Only hadamard_transform has a gradient (tested against the dense adjoint in test_hadamard.py); every other op
refuses an input that requires grad, where it used to cut the graph silently or fail deep inside a kernel."""

from __future__ import annotations

import pytest
import torch

from yaqa_ext import ops


def ldlq_args() -> list:
    return [torch.randn(4, 8), torch.eye(8), torch.eye(4), torch.ones(4, 1), torch.zeros(4, 1), 2, 8, 2, 2]


# (op, arguments, index of the argument that requires grad, its name in the message)
CASES = [
    (ops.block_ldl, lambda: [torch.eye(8) * 2, 4], 0, "H"),
    (ops.ldlq_round, ldlq_args, 0, "W"),
    (ops.ldlq_round, ldlq_args, 1, "L_in"),
    (ops.ldlq_round, ldlq_args, 3, "scales"),
    (ops.sketch_b_update, lambda: [torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.zeros(8, 8), torch.zeros(6, 6)],
     0, "X"),
    (ops.sketch_b_update, lambda: [torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.zeros(8, 8), torch.zeros(6, 6),
                                   torch.eye(8), None], 4, "P_in"),
    (ops.sketch_a_update, lambda: [torch.randn(4, 8), torch.randn(4, 6), torch.zeros(8, 8), torch.zeros(6, 6)], 1, "G"),
    (ops.input_moment_update, lambda: [torch.randn(4, 8), torch.zeros(8, 8)], 0, "X"),
]


@pytest.mark.parametrize("op, make, index, name", CASES)
def test_inputs_that_need_a_gradient_are_refused(op, make, index, name):
    args = make()
    args[index] = args[index].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=rf"{name} requires grad, but this op has no gradient; pass {name}\.detach\(\)"):
        op(*args)


@pytest.mark.parametrize("op, make, index, name", CASES)
def test_without_grad_mode_the_same_inputs_give_the_detached_result(op, make, index, name):
    """Under torch.no_grad no graph is wanted: the op runs and equals its run on detached inputs."""
    args = make()
    plain = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    args[index] = args[index].clone().requires_grad_(True)
    with torch.no_grad():
        out = op(*args)
    ref = op(*plain)
    if out is None:  # the accumulators (index 2 and 3, or 1 for input_moment_update) were updated in place
        accumulators = [1] if op is ops.input_moment_update else [2, 3]
        for i in accumulators:
            torch.testing.assert_close(args[i], plain[i], rtol=0, atol=0)
    else:
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
