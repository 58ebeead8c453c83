"""Word-region alignment: chosen caption words find their object among the image's patches.

FILIP's token-wise similarity (Yao et al. 2022), for a list of words only (colours, shapes,
object names): every occurrence of a listed word in caption i, as the text tower's state at
that position (read in context: "red" in "a red triangle"), is scored against every image j of
the batch by its best patch, s(w, j) = max_p cos(t_w, v_jp) / temperature, through the model's
own contrastive projections (no new parameters). Cross-entropy over j, the word's own image
being the target. An image whose caption also names the word is not a negative: it shows the
thing too (a triangle word contrasts its image only with images that have no triangle).

Why: the contrastive loss pools each side first, so a batch is told apart by whatever is
easiest (colours, positions) and the patch tokens never have to say what shape they hold; MLM
and ITM reach them only through a fresh fusion encoder that must first find the object. Here
the signal lands on the patch the word picks, in every image, from the first step.

Local batch only (no gather across ranks): the negatives are this rank's images. Clips: the
patches of every frame are candidates (no frame's CLS token: it is not a region).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_tokens(visual_tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The model's visual tokens (B, T * (1 + N), W) of images (B, 3, H, W) or clips
    (B, T, 3, H, W) -> their patch tokens (B, T * N, W): every frame's CLS token left out."""
    frames = images.shape[1] if images.ndim == 5 else 1
    return visual_tokens.unflatten(1, (frames, -1))[:, :, 1:].flatten(1, 2)


class WordRegionAlignment(nn.Module):
    """`loss/word_region`: words of `word_ids` against the batch's images, by their best patch."""

    needs = frozenset({"features", "visual_tokens", "text_states"})
    heads: tuple[str, ...] = ()

    def __init__(
        self,
        word_ids: torch.Tensor,
        weight: float = 1.0,
        temperature: float = 0.05,
        alone: torch.Tensor | None = None,
    ):
        """`word_ids` (K,) sorted token ids; `alone` (K, 3) each as a caption of its own,
        `[SOT, id, EOT]`: score the word's own text embedding (no context) instead of its
        state in the caption."""
        super().__init__()
        self.weight, self.temperature = weight, temperature
        self.word_ids: torch.Tensor
        self.register_buffer("word_ids", word_ids.long(), persistent=False)
        self.alone: torch.Tensor | None
        self.register_buffer("alone", alone, persistent=False)

    def forward(self, outputs: dict, model=None, batch: dict | None = None) -> dict:
        assert model is not None and batch is not None
        tokens = batch["text"]  # (B, L), cut to the batch's longest caption
        states = outputs["text_states"]  # (B, L, W)
        patches = patch_tokens(outputs["visual_tokens"], batch["image"])  # (B, T * N, W)
        is_word = torch.isin(tokens, self.word_ids)  # (B, L)
        owner = is_word.nonzero()[:, 0]  # (n,) the caption (= image) of each word occurrence
        if not len(owner):  # no listed word in the batch: nothing to align
            zero = patches.sum() * 0.0
            return {"loss/word_region": zero, "word_region/words": zero.detach()}
        word = tokens[is_word]  # (n,) token id of each occurrence
        if self.alone is None:
            words = F.normalize(model.project_text_states(states[is_word]).float(), dim=-1)
        else:  # each word's embedding as a caption of its own: what it names, not its context
            words = model.encode_text(self.alone).float()[torch.searchsorted(self.word_ids, word)]
        regions = F.normalize(model.project_visual_tokens(patches).float(), dim=-1)
        best = torch.einsum("nd,bpd->nbp", words, regions).amax(dim=-1)  # (n, B)
        logits = best / self.temperature
        # Images whose caption names the same word also show it: not negatives.
        names = (tokens[None] == word[:, None, None]).any(dim=-1)  # (n, B)
        own = F.one_hot(owner, len(tokens)).bool()
        logits = logits.masked_fill(names & ~own, float("-inf"))
        loss = F.cross_entropy(logits, owner)
        hit = (logits.argmax(dim=1) == owner).float().mean()
        return {
            "loss/word_region": self.weight * loss,
            "word_region/acc": hit.detach(),
            "word_region/words": torch.tensor(float(len(owner))),
        }
