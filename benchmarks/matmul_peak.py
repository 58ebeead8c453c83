"""Measured bf16 (and fp32) matmul peak of this machine, the denominator of model FLOP utilisation.

    python benchmarks/matmul_peak.py [--threads 2] [--size 1024]

Prints one JSON line: {"bench": "matmul_peak", "bf16_gflops": .., "fp32_gflops": .., ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def peak_gflops(dtype: torch.dtype, size: int, seconds: float = 3.0) -> float:
    """Best-of sustained GFLOP/s of square matmuls (what a well-shaped layer can reach)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "bench": "matmul_peak",
        "bf16_gflops": round(peak_gflops(torch.bfloat16, args.size), 1),
        "fp32_gflops": round(peak_gflops(torch.float32, args.size), 1),
        "threads": args.threads,
        "size": args.size,
        "unit": "GFLOP/s",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
