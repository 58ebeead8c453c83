"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated by pydantic.

A run is one config file plus a few overrides (``train.batch_size=128``). Every field carries a
docstring (pydantic keeps it as the field's description).
Unknown keys and wrong types end in one sentence naming the key, never a traceback.
`schema` holds the typed sections (`objectives` the objectives' section, `fields` what they
share), `loading` reads and writes them.
"""

from vlpt.config.fields import ConfigError
from vlpt.config.loading import dump_config, load_config, parse_override
from vlpt.config.objectives import (
    CaptionConfig,
    ITMConfig,
    MIMConfig,
    MLMConfig,
    ObjectivesConfig,
    WordRegionConfig,
)
from vlpt.config.schema import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    Source,
    TrainConfig,
)

__all__ = [
    "CaptionConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "ITMConfig",
    "LossConfig",
    "MIMConfig",
    "MLMConfig",
    "ModelConfig",
    "ObjectivesConfig",
    "RunConfig",
    "Source",
    "TrainConfig",
    "WordRegionConfig",
    "dump_config",
    "load_config",
    "parse_override",
]
