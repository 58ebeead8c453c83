"""Config loading: YAML + overrides, and one clear sentence for every user mistake."""

from pathlib import Path

import pytest

from vlpt.config import ConfigError, RunConfig, dump_config, load_config

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.train, f"{path.name} names no training data"
    if path.parent.name == "finetune":  # `vlpt finetune` takes init=CHECKPOINT on the command line
        assert cfg.init == "" and "init=" in path.read_text()


def test_a_shipped_init_is_the_run_folder_of_another_shipped_config():
    # e.g. the video config starts from the image run that `make train` writes.
    outputs = {load_config(path).output_dir: path.name for path in CONFIGS}
    for path in CONFIGS:
        init = load_config(path).init
        if init:
            assert init in outputs, f"{path.name}: init {init} is no shipped config's output_dir"
            assert outputs[init] != path.name


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        None,
        [
            "train.batch_size=64",
            "model.name=small",
            "data.train=/x/{0..3}.tar",
            "train.betas=[0.9, 0.95]",
        ],
    )
    assert cfg.train.batch_size == 64
    assert cfg.model.name == "small"
    assert cfg.data.train[0].url == "/x/{0..3}.tar" and cfg.data.train[0].weight == 1.0
    assert cfg.train.betas == (0.9, 0.95)


def test_sources_with_weights(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train:\n    - {url: a, weight: 2}\n    - b\n")
    cfg = load_config(p)
    assert [(s.url, s.weight) for s in cfg.data.train] == [("a", 2.0), ("b", 1.0)]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(
        ConfigError,
        match=r"'train.batch_sise' does not exist \(did you mean 'train.batch_size'\?\)",
    ):
        load_config(None, ["train.batch_sise=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'train.max_steps' = 'lots' is invalid"):
        load_config(None, ["train.max_steps=lots"])


def test_invalid_value_names_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=0"])


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_dump_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0], ["train.lr=0.01"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)
            else:
                yield f"{model.__name__}.{name}", field.description

    undocumented = [name for name, doc in walk(RunConfig) if not doc]
    assert undocumented == []


def test_reversed_pairs_need_an_even_batch():
    with pytest.raises(ConfigError, match="batch_size must be even") as e:
        load_config(None, ["data.reversed_pairs=true", "train.batch_size=15"])
    assert "{" not in str(e.value)  # one sentence, not the section's whole value
