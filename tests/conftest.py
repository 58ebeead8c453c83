"""Shared fixtures: a small synthetic world, written once per test session."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
MICRO_MODEL = str(ROOT / "tests/fixtures/micro.json")


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores, several test processes: oversubscribing threads only slows everything down.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory) -> Path:
    """A few shards of the synthetic world: 600 train, 100 val, 100 test images at 32 px."""
    from vlpt.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(
        out,
        seed=0,
        n_train=600,
        n_val=100,
        n_test=100,
        size=32,
        shard_size=200,
        workers=1,
        progress=False,
    )
    return out


def run_overrides(world: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that point the default config at the test world and the micro model."""
    return [
        f"output_dir={out}",
        f"model.name={MICRO_MODEL}",
        f"data.train={world / 'train'}",
        f"data.val={world / 'val'}",
        f"data.test={world / 'test'}",
        "data.workers=0",
        "data.shuffle_buffer=100",
        "train.batch_size=32",
        "train.threads=1",
        "train.warmup_steps=2",
        "train.progress=false",
        "train.tensorboard=true",
        "train.max_minutes=0",
        "eval.batch_size=50",
        *extra,
    ]
