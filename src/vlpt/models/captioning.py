"""Captions from pixels in one call: the vision tower's tokens, then the caption decoder.

model = load_trained_model(ckpt)[0]           # or build_model("tiny-conv-caption").eval()
texts = caption_images(model, get_tokenizer("tiny-conv-caption"), pixels, num_beams=3)
"""

from __future__ import annotations

from typing import Any

import torch

from vlpt.models.generation import GenerationConfig, generate_captions
from vlpt.models.model import VisionLanguageModel
from vlpt.models.tokenizer import Tokenizer


@torch.no_grad()
def caption_images(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    pixels: torch.Tensor,
    *,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> list[str]:
    """Normalised images (B, 3, H, W) or clips (B, T, 3, H, W) -> B captions.

    `options` are `GenerationConfig` fields (`num_beams`, `max_new_tokens`, `do_sample`,
    `top_p`, `repetition_penalty`, ...); the default is greedy decoding. The model should be in
    eval mode (patch dropout would otherwise hide tokens from the decoder). A model without a
    caption decoder is a ValueError saying so.
    """
    decoder = model.caption_decoder()
    _, visual_tokens = model.encode_image_with_tokens(pixels)  # (B, N', W)
    captions = generate_captions(
        decoder, visual_tokens, tokenizer, config=config, generator=generator, **options
    )
    return captions.texts
