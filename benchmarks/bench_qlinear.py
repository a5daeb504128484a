"""QuantizedLinear (4-bit codes, per-channel scales, RHT on and off) vs nn.Linear in fp32 and bf16, per layer.

    .venv/bin/python benchmarks/bench_qlinear.py [--bits 4] [--batches 1 16 256]
        [--shapes 576x576 1536x576 2048x2048 4096x4096 11008x4096]

Shapes are out x in. Prints median times and the ratios nn.Linear fp32 / ours (> 1: ours is faster) and
nn.Linear bf16 / ours, all measured in this run; the layer's bytes read per call (packed codes and scales); and
ours with bf16 activations (a bf16 model's layer) against nn.Linear bf16.
``--generate MODEL`` (e.g. smollm2-135m) also times greedy ``generate`` of the original model against its
round-to-nearest quantization at ``--bits`` (every decoder linear, RHT), tokens/s, same prompt and length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext.codebooks import IntGrid  # noqa: E402
from yaqa_ext.hadamard import RHT  # noqa: E402
from yaqa_ext.qlinear import QuantizedLinear  # noqa: E402
from yaqa_ext.rounding import Rounded  # noqa: E402


def layer(m: int, n: int, bits: int, rht: bool, device: str) -> QuantizedLinear:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (m, n), generator=g).to(torch.uint8)
    grid = IntGrid(scales=(torch.rand(m, 1, generator=g) + 0.01).half().float(),
                   zeros=torch.full((m, 1), (2**bits - 1) / 2), bits=bits, group_size=n)
    rounded = Rounded(grid.decode(codes), codes)
    return QuantizedLinear.from_rounding(rounded, grid, RHT(m, n, seed=0) if rht else None, None).to(device)


def generate_speed(model_name: str, bits: int, new_tokens: int, repeats: int) -> None:
    """Greedy decoding tokens/s of the original model and of its RTN quantization, measured in one run."""
    import copy
    import time

    from yaqa_ext import QuantConfig, quantize
    from yaqa_ext.models import load_model

    model, tok = load_model(model_name)
    quantized = copy.deepcopy(model)
    quantize(quantized, QuantConfig(method="rtn", bits=bits), progress=False)
    ids = torch.tensor([tok.encode("The capital of France is")])
    for name, m in (("original fp32", model), (f"quantized {bits}-bit rtn", quantized)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
        rate = new_tokens / sorted(times)[len(times) // 2]
        print(f"{model_name} {name:24s} {rate:8.1f} tokens/s ({new_tokens} new tokens, batch 1): "
              f"{tok.decode(out[0, ids.size(1):ids.size(1) + 8])!r}...", flush=True)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "2048x2048", "4096x4096", "11008x4096"])
    parser.add_argument("--generate", default=None, help="also time generate on this model (e.g. smollm2-135m)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.generate:
        generate_speed(args.generate, args.bits, args.new_tokens, args.repeats)
    print(f"QuantizedLinear {args.bits}-bit vs nn.Linear, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'device':28s} {'shape':>11s} {'batch':>5s} {'rht':>4s} {'ours ms':>9s} {'fp32 ms':>9s} {'bf16 ms':>9s} "
          f"{'fp32/ours':>9s} {'bf16/ours':>9s} {'ours GB/s':>9s} {'ours16 ms':>9s} {'bf16/o16':>9s}")
    for device in args.devices:
        for shape in args.shapes:
            m, n = map(int, shape.split("x"))
            dense = torch.nn.Linear(n, m, bias=False, device=device)
            dense16 = torch.nn.Linear(n, m, bias=False, device=device, dtype=torch.bfloat16)
            for rht in (False, True):
                q = layer(m, n, args.bits, rht, device)
                read = q.qweight.numel() + q.scales.numel() * 2 + q.zeros.numel() * 2
                for batch in args.batches:
                    x = torch.randn(batch, n, device=device)
                    x16 = x.bfloat16()
                    with torch.no_grad():
                        ours = median_seconds(lambda: q(x), device, args.repeats)
                        fp32 = median_seconds(lambda: dense(x), device, args.repeats)
                        bf16 = median_seconds(lambda: dense16(x16), device, args.repeats)
                        ours16 = median_seconds(lambda: q(x16), device, args.repeats)  # a bf16 model's activations
                    print(f"{device_name(device):28s} {shape:>11s} {batch:5d} {'yes' if rht else 'no':>4s} "
                          f"{1e3 * ours:9.3f} {1e3 * fp32:9.3f} {1e3 * bf16:9.3f} {fp32 / ours:8.2f}x "
                          f"{bf16 / ours:8.2f}x {read / ours / 1e9:9.2f} {1e3 * ours16:9.3f} {bf16 / ours16:8.2f}x",
                          flush=True)


if __name__ == "__main__":
    main()
