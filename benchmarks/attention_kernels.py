"""Which scaled-dot-product-attention kernel is fastest for vlpt's shapes on this machine.

    python benchmarks/attention_kernels.py [--threads 2]

Forward + backward of SDPA in bf16 at the tiny model's shapes (ViT: 65 tokens, no mask; text:
~24 tokens, causal), per kernel, best of several repeats. Prints one JSON line; `train.attention=auto`
follows what it shows on CPU (the plain `math` kernel).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"vision": (256, 3, 65, 64, False), "text": (256, 3, 24, 64, True)}
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def time_kernel(backend: SDPBackend, shape: tuple, repeats: int = 5) -> float:
    """Best-of milliseconds for one forward + backward."""
    b, h, length, d, causal = shape
    q, k, v = (
        torch.randn(b, h, length, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    best = float("inf")
    with sdpa_kernel(backend):
        for i in range(repeats + 2):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            if i >= 2:  # first calls allocate
                best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {
        "bench": "attention_kernels",
        "threads": args.threads,
        "unit": "ms per forward+backward",
    }
    for shape_name, shape in SHAPES.items():
        for kernel_name, backend in KERNELS.items():
            result[f"{shape_name}_{kernel_name}_ms"] = round(time_kernel(backend, shape), 2)
        result[f"{shape_name}_math_speedup"] = round(
            result[f"{shape_name}_flash_ms"] / result[f"{shape_name}_math_ms"], 2
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
