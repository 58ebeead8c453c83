"""The layout DESIGN.md promises: layer contracts, shipped files, the CLI surface."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_import_layers_hold():
    # import-linter reads the contracts in pyproject.toml (models import nothing from the rest).
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout


def test_cli_subcommands_are_stable():
    from vlpt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"data", "pretrain", "eval", "models"} <= set(sub.choices)
    args = parser.parse_args(["pretrain", "c.yaml", "train.batch_size=3", "--dry-run"])
    assert args.overrides == ["train.batch_size=3"] and args.dry_run
    args = parser.parse_args(["eval", "retrieval", "--checkpoint", "c", "--data", "d", "--json"])
    assert args.json and args.data == "d"
    args = parser.parse_args(["data", "synth", "out", "--seed", "3", "--images", "10"])
    assert (args.seed, args.images) == (3, 10)


def test_user_errors_are_one_sentence(tmp_path):
    vlpt = Path(sys.executable).parent / "vlpt"
    result = subprocess.run(
        [str(vlpt), "pretrain", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("vlpt: error: config file")
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [str(vlpt), "pretrain", str(ROOT / "configs/pretrain/synthetic-tiny.yaml"), "train.nope=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "'train.nope' does not exist" in result.stderr


def test_generated_things_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", "/data/", "/runs/"):
        assert entry in ignored


def test_synth_bad_argument_is_one_sentence(tmp_path):
    vlpt = Path(sys.executable).parent / "vlpt"
    result = subprocess.run(
        [str(vlpt), "data", "synth", str(tmp_path / "w"), "--images", "-5", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("vlpt: error:") and "Traceback" not in result.stderr
