"""Precision of sketch_b_update on real activations: SmolLM2-135M's layer inputs and output gradients,
each contraction and product mode against the same update computed in fp64.

    .venv/bin/python benchmarks/sketch_precision.py [--layers 0 15 29] [--seq-len 512] [--batch 4]

For each linear of the chosen decoder layers, (X, G) of one batch are captured with hooks (targets
sampled from the model, as in collection). The reference is sketch_b_update on the fp64 copies; the
table gives the relative Frobenius error ||H - H_fp64|| / ||H_fp64|| of each factor for fp32
products (both contraction orders), TF32 on GPU, and activations rounded to bf16 first (what a bf16
model hands over: the error of the activations themselves, not of the products).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name  # noqa: E402

from yaqa_ext import sketch_b_update  # noqa: E402
from yaqa_ext.data import corpus_texts, prepare_tokens  # noqa: E402
from yaqa_ext.arch import find_targets  # noqa: E402
from yaqa_ext.hessians import _backward_sampled_loss  # noqa: E402
from yaqa_ext.models import load_model  # noqa: E402


def capture(model, tokens: torch.Tensor, layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(X, G) of every linear in ``layers`` for one batch, from forward hooks and tensor hooks."""
    store: dict[str, list] = {}
    handles = []
    for t in find_targets(model, layers):
        def hook(module, inputs, output, name=t.name):
            store[name] = [inputs[0].detach()]
            output.register_hook(lambda g, name=name: store[name].append(g.detach()))
        handles.append(t.module.register_forward_hook(hook))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    for p in model.parameters():
        p.requires_grad_(False)
    logits = model(input_ids=tokens, use_cache=False).logits
    _backward_sampled_loss(logits, 0, 0, list(range(tokens.size(0))), tokens.size(1))
    for h in handles:
        h.remove()
    return {k: (v[0], v[1]) for k, v in store.items()}


def relative_errors(X, G, rounded: torch.dtype, device: str, contraction: str, tf32: bool) -> tuple[float, float]:
    """||H - H_ref|| / ||H_ref|| of both factors: H from (X, G) rounded to ``rounded`` on ``device``, H_ref the
    fp64 update of the unrounded (X, G)."""
    n, m = X.size(-1), G.size(-1)
    ref_in, ref_out = torch.zeros(n, n, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
    sketch_b_update(X.double(), G.double(), ref_in, ref_out)
    H_in, H_out = torch.zeros(n, n, device=device), torch.zeros(m, m, device=device)
    sketch_b_update(X.to(device, rounded), G.to(device, rounded), H_in, H_out, allow_tf32=tf32, contraction=contraction)
    return tuple(float((H.double().cpu() - R).norm() / R.norm()) for H, R in ((H_in, ref_in), (H_out, ref_out)))


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=1)
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 15, 29])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    tokens = prepare_tokens(corpus_texts("calibration"), tokenizer, args.batch, args.seq_len)
    acts = capture(model, tokens, args.layers)
    print(f"sketch_b_update relative error vs fp64 on SmolLM2-135M activations ({args.batch} x {args.seq_len} tokens)")
    print(f"{'device':34s} {'module':34s} {'mode':22s} {'H_in':>9s} {'H_out':>9s}")
    for device in args.devices:
        modes = [("fp32 gradient", "gradient", False, torch.float32), ("fp32 gram", "gram", False, torch.float32),
                 ("bf16 activations", "auto", False, torch.bfloat16)]
        if device.startswith("cuda"):
            modes.append(("tf32 auto", "auto", True, torch.float32))
        for name, (X, G) in acts.items():
            for label, contraction, tf32, rounded in modes:
                e_in, e_out = relative_errors(X, G, rounded, device, contraction, tf32)
                print(f"{device_name(device):34s} {name.removeprefix('model.'):34s} {label:22s} {e_in:9.2e} {e_out:9.2e}",
                      flush=True)


if __name__ == "__main__":
    main()
