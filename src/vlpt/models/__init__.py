"""Library code only: towers, heads, the registry of architectures and the tokenizer."""

from vlpt.models.captioning import caption_images
from vlpt.models.generation import GenerationConfig
from vlpt.models.model import VisionLanguageModel, build_model
from vlpt.models.registry import UnknownModelError, get_model_config, list_models
from vlpt.models.tokenizer import Tokenizer
from vlpt.models.weights import WeightsError


def get_tokenizer(name_or_path: str = "tiny") -> Tokenizer:
    """The tokenizer for a registered architecture (its context length)."""
    return Tokenizer(get_model_config(name_or_path)["text_cfg"]["context_length"])


__all__ = [
    "GenerationConfig",
    "Tokenizer",
    "UnknownModelError",
    "VisionLanguageModel",
    "WeightsError",
    "build_model",
    "caption_images",
    "get_model_config",
    "get_tokenizer",
    "list_models",
]
