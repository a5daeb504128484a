"""The codebook seam: a codebook defined outside the package (a toy 2-D vector codebook, 16 codewords for each
pair of weights: 2 bits per weight) is registered, rounds through quantize(), stores its own buffers, runs its
own matmul, and saves and reloads through from_pretrained, with no other change to yaqa_ext."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from conftest import tiny_model
from reference import tile_ldlq_reference
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from yaqa_ext import Codebook, Grid, QuantConfig, QuantizedLinear, ldlq_round, quantize, round_to_nearest
from yaqa_ext.codebooks import CODEBOOKS, register_codebook

CODEWORDS = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class PairGrid(Grid):
    """Each pair of columns (2j, 2j + 1) of a row coded as the nearest of 16 codewords times the row's scale."""

    codebook: ClassVar[str] = "pair-toy"
    scale: Tensor  # (m, 1)

    def _nearest(self, x: Tensor) -> Tensor:  # (rows, 2k) -> (rows, k) codes, by brute force over the codebook
        pairs = x.reshape(x.size(0), -1, 1, 2)
        return (pairs - CODEWORDS).square().sum(-1).argmin(-1).to(torch.uint8)

    def encode(self, W: Tensor) -> Tensor:
        return self._nearest(W / self.scale)

    def decode(self, codes: Tensor) -> Tensor:
        return CODEWORDS[codes.long()].reshape(codes.size(0), -1) * self.scale

    def ldlq_round(self, W, L_in, L_out, td_x, td_y):
        def round_tile(x: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
            codes = self._nearest(x / self.scale[rows])
            return CODEWORDS[codes.long()].reshape(x.shape) * self.scale[rows], codes

        m, n = W.shape
        return tile_ldlq_reference(W, L_in, L_out, td_x, td_y, round_tile, (m, n // 2), torch.uint8)

    def layout(self) -> dict[str, Any]:
        return {}


class PairCodebook(Codebook):
    name: ClassVar[str] = "pair-toy"
    format_version: ClassVar[int] = 1
    unit: ClassVar[tuple[int, int]] = (1, 2)
    bits = 2

    @classmethod
    def from_config(cls, config) -> PairCodebook:
        if config.bits != 2:
            raise ValueError("pair-toy is a 2-bit codebook")
        return cls()

    def fit(self, W: Tensor) -> PairGrid:
        return PairGrid(W.square().mean(1, keepdim=True).sqrt().half().float())

    @classmethod
    def create_weights(cls, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.register_buffer("pair_codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        layer.register_buffer("pair_scale", torch.ones(out_features, 1, dtype=torch.float16))

    @classmethod
    def pack(cls, layer: nn.Module, codes: Tensor, grid: PairGrid) -> None:
        layer.pair_codes.copy_(codes)
        layer.pair_scale.copy_(grid.scale)

    @classmethod
    def unpack(cls, layer: nn.Module) -> tuple[Tensor, PairGrid]:
        return layer.pair_codes, PairGrid(layer.pair_scale.float())

    @classmethod
    def check_values(cls, layer: nn.Module, name: str) -> None:
        if not bool(torch.isfinite(layer.pair_scale).all()):
            raise ValueError(f"{name}.pair_scale is not finite")

    @classmethod
    def matmul(cls, layer: nn.Module, x: Tensor, rht) -> Tensor:
        codes, grid = cls.unpack(layer)
        W_hat = grid.decode(codes).to(x.dtype)
        return x @ W_hat.T if rht is None else rht.output_inverse(rht.input_transform(x) @ W_hat.T)


@pytest.fixture
def pair_codebook():
    register_codebook(PairCodebook)
    yield PairCodebook
    del CODEBOOKS[PairCodebook.name]


def test_vector_codebook_rounding(pair_codebook):
    """ldlq_round with a 2-D codebook: nearest codewords without feedback (brute force over all 16 for every
    pair), tiles checked against the codebook's unit, and two-sided feedback lowering the proxy loss."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 12, generator=g)
    grid = PairCodebook().fit(W)
    rtn = round_to_nearest(W, grid)
    candidates = CODEWORDS * grid.scale.reshape(8, 1, 1, 1)  # (8, 1, 16, 2)
    distances = (W.reshape(8, 6, 1, 2) - candidates).square().sum(-1)  # (8, 6, 16)
    assert torch.equal(rtn.W_hat.reshape(8, 6, 2), torch.take_along_dim(candidates.squeeze(1), distances.argmin(-1)
                                                                        .unsqueeze(-1).expand(8, 6, 2).long(), 1))
    with pytest.raises(ValueError, match=r"codebook 'pair-toy' codes 1 x 2 weights jointly: td_x \(2\) and td_y \(3\)"):
        ldlq_round(W, None, None, quantizer=grid, td_x=2, td_y=3)


def test_vector_codebook_model_round_trip(pair_codebook, tmp_path):
    model = tiny_model("llama")
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    q = copy.deepcopy(model)
    config = QuantConfig(method="yaqa", quantizer="pair-toy", bits=2, rht=False, td_x=1, td_y=1)
    report = quantize(q, config, data=tokens, n_seqs=8, seq_len=16, progress=False)
    assert {r.tiles for r in report.layers} == {(1, 2)}  # td_y raised to the codebook's unit
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.codebook == "pair-toy"
    assert sorted(name for name, _ in layer.named_buffers()) == ["pair_codes", "pair_scale"]
    assert layer.bits_per_weight() == pytest.approx((16 * 12 * 8 + 16 * 16) / (16 * 24))
    x = torch.randn(3, 24)
    codes = layer.pair_codes.long()
    W_ref = (CODEWORDS[codes].reshape(16, 24) * layer.pair_scale.float())  # decoded by hand
    torch.testing.assert_close(layer(x), x @ W_ref.T, rtol=1e-6, atol=1e-6)  # fp32 matmul rounding only
    q.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)
