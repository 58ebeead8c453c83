"""Greedy caption generation with and without the KV cache: tokens per second, same outputs.

    python benchmarks/generation_speed.py [--decoder tiny-masked|tiny|coca-base] [--threads 2]
                                          [--batch 16]
                                          [--new-tokens 32] [--device cpu]
                                          [--vocabulary data/synthetic/train]

A randomly initialised caption decoder generates exactly `--new-tokens` tokens per caption
(`min_new_tokens` forbids an early end, so both paths do the same work).
`--decoder tiny-masked` (default) is the shipped caption config's `tiny-conv-masked-caption`
decoder: width 192, 6 layers (a norm after the 4th), 3 heads, context 40, open_clip's
49408-token vocabulary, reading 65 visual tokens of width 192 (the tiny ViT's 64 patches + class
token); `--decoder tiny` is `tiny-conv-caption`'s, the same with 4 layers (both read from the
registry). `--decoder coca-base` is the multimodal decoder of open_clip's `coca_ViT-B-32`
(width 512, 12 layers, 8 heads, context 76) reading ViT-B/32's 50 visual tokens of width 768:
the size at which CoCa users caption. The uncached path recomputes the whole prefix every step
but projects only the last position to the vocabulary.
Best of `--repeats` runs of each, alternating so that a shared machine's load hits both alike,
after a warm-up. Prints one JSON line, with the 1-minute load average at start and end.

`--vocabulary SHARDS` gives the decoder the output vocabulary of those shards' captions, as
`objectives.caption.vocabulary=train` does (the shipped caption config: 85 tokens for the
synthetic world), instead of the tokenizer's 49,408.

What bounds the ratio at the tiny size with the whole vocabulary: the vocabulary projection
(16 x 192 x 49408, 38 MB of fp32 weights read per step) is the same work in both paths and
~60% of a cached step on CPU, so caching the prefix (17 tokens on average) can only shrink the
rest of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vlpt.config import Source
from vlpt.data.vocabulary import caption_vocabulary
from vlpt.models import get_model_config, get_tokenizer
from vlpt.models.decoder import CaptionDecoder
from vlpt.models.generation import generate


def registry_decoder(name: str) -> tuple[dict, int]:
    """A registered model's caption decoder config, sized as the model builds it, and the
    number of visual tokens its vision tower gives an image (patches + class token)."""
    cfg = get_model_config(name)
    text, vision = cfg["text_cfg"], cfg["vision_cfg"]
    sizes = {"context_length": text["context_length"], "visual_width": vision["width"]}
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return {"width": text["width"], **sizes, **cfg["decoder_cfg"]}, tokens


# name -> (decoder_cfg, visual tokens per image)
DECODERS = {
    "tiny-masked": registry_decoder("tiny-conv-masked-caption"),
    "tiny": registry_decoder("tiny-conv-caption"),
    "coca-base": (
        {"width": 512, "layers": 12, "heads": 8, "context_length": 76, "visual_width": 768},
        50,
    ),
}
SOT, EOT = 49406, 49407


def time_generation(
    decoder: CaptionDecoder, visual: torch.Tensor, new_tokens: int, repeats: int
) -> dict[bool, tuple[float, torch.Tensor]]:
    """use_cache -> (best-of wall-clock seconds of one batched greedy generation, its tokens).

    The two paths alternate, so a shared machine's changing load hits both alike.
    """
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    results = {}
    for use_cache in (True, False):  # warm-up, and the tokens to compare
        tokens = generate(decoder, visual, sot_id=SOT, eot_id=EOT, use_cache=use_cache, **options)
        results[use_cache] = (float("inf"), tokens)
    for _ in range(repeats):
        for use_cache in (True, False):
            _sync(visual.device)
            start = time.perf_counter()
            generate(decoder, visual, sot_id=SOT, eot_id=EOT, use_cache=use_cache, **options)
            _sync(visual.device)
            best, tokens = results[use_cache]
            results[use_cache] = (min(best, time.perf_counter() - start), tokens)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decoder", choices=sorted(DECODERS), default="tiny-masked")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--vocabulary",
        default="",
        help="shards whose captions' tokens the decoder predicts (default: the whole vocabulary)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    device = torch.device(args.device)
    decoder_cfg, visual_tokens = DECODERS[args.decoder]
    decoder = CaptionDecoder(decoder_cfg).to(device).eval()
    if args.vocabulary:
        tokenizer = get_tokenizer("tiny")
        vocab = caption_vocabulary([Source(url=args.vocabulary)], tokenizer, 200_000)
        decoder.set_output_vocabulary(vocab.token_ids)
    visual = torch.randn(args.batch, visual_tokens, decoder_cfg["visual_width"], device=device)

    results = time_generation(decoder, visual, args.new_tokens, args.repeats)
    (cached_s, cached), (uncached_s, uncached) = results[True], results[False]
    if not torch.equal(cached, uncached):
        raise SystemExit("cached and uncached generation gave different tokens")
    assert cached.shape == (args.batch, 1 + args.new_tokens)
    generated = args.batch * args.new_tokens
    print(
        json.dumps(
            {
                "bench": "generation_speed",
                "cached_tokens_per_s": round(generated / cached_s, 1),
                "uncached_tokens_per_s": round(generated / uncached_s, 1),
                "speedup": round(uncached_s / cached_s, 2),
                "same_tokens": True,
                "batch_size": args.batch,
                "new_tokens": args.new_tokens,
                "decoder": args.decoder,
                "decoder_cfg": decoder_cfg,
                "output_vocabulary": len(decoder.output_tokens) or decoder.cfg.vocab_size,
                "visual_tokens": visual_tokens,
                "device": str(device),
                "threads": args.threads,
                # Timings on a shared machine are only comparable at similar load.
                "load_average_1min": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
