"""quantize runtime: PyTorch's packed int8/int4 matmul kernels against a dense matmul, per shape.

Why the quantized layers run a dense matmul on a dequantized (cached) weight
on CPU: this measures, side by side on the same inputs, the time of

- ``dense``: ``x @ W.T`` (fp32 and bf16),
- ``int8pack``: ``torch._weight_int8pack_mm`` (symmetric per-channel int8),
- ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (group 128, bf16 input),
- ``dequant``: dequantizing an int8 weight then the dense matmul (the
  ``--runtime memory`` path),

for the layer shapes of a ViT-B MLP and an EfficientNet projection at the
CPU batch size (8 images). On CUDA, run with ``--device cuda`` to time
``torch._weight_int4pack_mm`` the same way.

    .venv/bin/python bench/quant_kernels.py
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(8 * 197, 768, 3072), (8 * 197, 3072, 768), (8 * 784, 256, 128)]  # (rows, in, out)


def timed(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, ms per call")
    for rows, k, n in SHAPES:
        x = torch.randn(rows, k, device=device)
        w = torch.randn(n, k, device=device)
        q8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
        s8 = torch.rand(n, device=device)
        xb, wb = x.bfloat16(), w.bfloat16()
        row = {
            "dense fp32": timed(lambda: x @ w.T, args.repeats, device),
            "dense bf16": timed(lambda: xb @ wb.T, args.repeats, device),
            "dequant+dense fp32": timed(lambda: x @ (q8.float() * s8[:, None]).T, args.repeats, device),
        }
        if device == "cpu":
            row["int8pack fp32"] = timed(lambda: torch._weight_int8pack_mm(x, q8, s8), 2, device)
            row["int8pack bf16"] = timed(lambda: torch._weight_int8pack_mm(xb, q8, s8.bfloat16()), args.repeats, device)
            q4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = torch.rand(k // 128, n, 2).bfloat16()
            row["int4pack bf16 g128"] = timed(
                lambda: torch._weight_int4pack_mm_for_cpu(xb, q4, 128, sz), args.repeats, device
            )
        else:
            # CUDA takes [out, in / 2] uint8 (two 4-bit values per byte) and inner k-tiles.
            q4 = torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device), 8
            )
            sz = torch.rand(k // 128, n, 2, device=device).bfloat16()
            row["int4pack bf16 g128"] = timed(lambda: torch._weight_int4pack_mm(xb, q4, 128, sz), args.repeats, device)
        print(f"[{rows}x{k}] @ [{k}x{n}]: " + ", ".join(f"{name} {ms:.2f}" for name, ms in row.items()))


if __name__ == "__main__":
    main()
