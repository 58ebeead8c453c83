"""Caption evaluation and `vlpt caption`: metrics on tiny shards, attribute accuracy of clips,
file captioning with an unreadable input, and the error for a checkpoint without a decoder."""

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL, ROOT
from data_fixtures import image_bytes, sample, write_shard
from PIL import Image

from vlpt.cli import main
from vlpt.config import RunConfig, Source, dump_config
from vlpt.data import MediaFileReader, UnreadableMedia, iter_eval_batches, normalize_pixels
from vlpt.data.synthetic import write_dataset, write_video_dataset
from vlpt.data.synthetic.video_writer import encode_mp4
from vlpt.eval.caption import GeneratedCaptions, score_captions
from vlpt.eval.clip_attributes import clip_attribute_accuracy, parse_event_mentions
from vlpt.models import build_model, get_model_config
from vlpt.train.checkpoint import save_checkpoint

MICRO_CAPTION = str(ROOT / "tests/fixtures/micro-caption.json")
METRIC_KEYS = {"bleu4", "cider", "rouge_l", "attr_acc", "n_items"}


def _shard_files(folder: Path) -> list[dict[str, bytes]]:
    """Every sample of a folder's shards as {ext: bytes}."""
    files: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                files[f"{shard.name}/{key}"][ext] = tar.extractfile(member).read()
    return list(files.values())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """12 val images and 6 val clips (4 frames) of the synthetic world at 32 px."""
    out = tmp_path_factory.mktemp("caption-world")
    write_dataset(out, n_train=0, n_val=12, n_test=0, size=32, workers=1, progress=False)
    write_video_dataset(
        out / "video", n_train=0, n_val=6, n_test=0, size=32, num_frames=4, workers=1,
        progress=False,
    )  # fmt: skip
    return out


def _checkpoint(root: Path, architecture: str) -> Path:
    """An untrained model of `architecture` saved as a run folder `vlpt eval` can load."""
    torch.manual_seed(0)
    model = build_model(architecture)
    cfg = RunConfig()
    cfg.model.name = architecture
    cfg.data.num_frames = 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(
        root / "checkpoints",
        1,
        model,
        optimizer,
        {"step": 1, "samples": 0},
        dump_config(cfg),
        architecture=get_model_config(architecture),
    )
    return root


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("caption-run"), MICRO_CAPTION)


# ---- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["val", "video/val"])
def test_eval_caption_prints_the_contract_keys(world, caption_run, data, capsys):
    args = ["eval", "caption", "--checkpoint", str(caption_run), "--data", str(world / data)]
    assert main([*args, "--max-length", "6", "--batch-size", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= METRIC_KEYS
    assert result["n_items"] == result["n_attr_items"] == (6 if "video" in data else 12)
    assert 0 <= result["bleu4"] <= 1 and 0 <= result["rouge_l"] <= 1 and result["cider"] >= 0
    assert 0 <= result["attr_acc"] <= 1 and result["skips"] == {}


def test_beam_search_and_sampling_options_run(world, caption_run, capsys):
    args = ["eval", "caption", "--checkpoint", str(caption_run), "--data", str(world / "val")]
    for options in (["--beam-size", "2"], ["--top-p", "0.9", "--seed", "1"]):
        assert main([*args, *options, "--max-length", "4", "--max-items", "3", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_items"] == 3
    assert main([*args, "--beam-size", "2", "--top-p", "0.9"]) == 2  # one or the other
    assert "num_beams" in capsys.readouterr().err


@pytest.mark.parametrize("data", ["val", "video/val"])
def test_reference_captions_score_perfect_attributes(world, data):
    generated, wrong = GeneratedCaptions(), GeneratedCaptions()
    for i, files in enumerate(_shard_files(world / data)):
        references = files["txt"].decode().splitlines()
        meta = json.loads(files["json"])
        generated.add(str(i), references[0], references, meta)
        wrong.add(str(i), "a purple cross moves left and a white star shrinks", references, meta)
    perfect, bad = score_captions(generated), score_captions(wrong)
    assert perfect["attr_acc"] == 1.0 and perfect["n_attr_items"] == perfect["n_items"]
    assert perfect["bleu4"] > 0.3 and perfect["cider"] > bad["cider"]
    assert bad["attr_acc"] < 0.5 and bad["bleu4"] < perfect["bleu4"]


def test_items_without_synthetic_metadata_have_no_attribute_accuracy():
    generated = GeneratedCaptions()
    generated.add("a", "a dog on a sofa", ["a dog on a sofa", "a brown dog"], {})
    generated.add("b", "two cats", ["two cats sleeping"], {})
    scores = score_captions(generated)
    assert scores["attr_acc"] is None and scores["n_attr_items"] == 0 and scores["n_items"] == 2


def test_items_with_missing_or_empty_captions_are_counted_skips(tmp_path, caption_run, capsys):
    good = [sample(f"{i:03d}", caption="a red circle\na circle that is red") for i in range(3)]
    bad = [sample("nocap", caption=None), sample("blank", caption="  \n \n")]
    write_shard(tmp_path / "00000.tar", [good[0], bad[0], good[1], bad[1], good[2]])
    args = ["eval", "caption", "--checkpoint", str(caption_run), "--data", str(tmp_path)]
    assert main([*args, "--max-length", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_items"] == 3 and result["attr_acc"] is None
    assert result["skips"] == {"missing_caption": 1, "empty_caption": 1}


# ---- clip attribute accuracy -------------------------------------------------------------------

CLIP = {
    "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
        {"shape": "square", "colour": "blue", "size": "large", "position": "center"},
    ],
    "events": [
        {"action": "moves right", "object": 0, "from": "top left", "to": "top"},
        {"action": "changes colour", "object": 1, "from": "blue", "to": "green"},
    ],
}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("the red circle moves right, then the blue square turns green", 1),
        ("the blue square becomes green after the small red circle slides to the right", 1),
        (
            "first the red circle in the top left corner goes from the top left to the top; "
            "after that the big blue square changes from blue to green",
            1,
        ),  # fmt: skip
        ("the red circle moves right", 1 / 2),  # one event missing
        ("the red circle moves left, then the blue square turns green", 1 / 3),  # wrong way
        ("the big red circle moves right, then the blue square turns green", 1 / 2),  # wrong size
        ("the red circle at the bottom moves right, then the blue square turns green", 1 / 2),
        ("the blue square turns red, then the red circle moves right", 1 / 3),  # wrong colour
        ("a red circle and a blue square", 0),  # no actions
        ("", 0),
    ],
)
def test_clip_attribute_accuracy_on_hand_written_captions(caption, expected):
    assert clip_attribute_accuracy(caption, CLIP) == pytest.approx(expected)


def test_pronouns_continue_the_object_with_its_new_colour():
    mentions = parse_event_mentions("the white square turns red, then it moves up and to the left")
    assert [(m.colour, m.shape, m.action) for m in mentions] == [
        ("white", "square", "changes colour to red"),
        ("red", "square", "moves up and left"),
    ]


def test_every_reference_clip_caption_is_fully_correct(world):
    for files in _shard_files(world / "video" / "val"):
        meta = json.loads(files["json"])
        for caption in files["txt"].decode().splitlines():
            assert clip_attribute_accuracy(caption, meta) == 1.0, (caption, meta["events"])
        for caption in meta["reversed_captions"]:  # the clip played backwards: other events
            assert clip_attribute_accuracy(caption, meta) < 1.0, caption


# ---- files -------------------------------------------------------------------------------------


def _media_files() -> dict[str, bytes]:
    frames = [Image.new("RGB", (48, 40), (40 * i, 90, 200 - 40 * i)) for i in range(5)]
    return {
        "wide.jpg": image_bytes(64, 40, seed=1),
        "tall.png": image_bytes(30, 50, seed=2, fmt="PNG"),
        "clip.mp4": encode_mp4(frames, fps=4),
    }


def test_files_are_preprocessed_like_the_evaluation_shards(tmp_path):
    media = _media_files()
    shard = [sample(name.split(".")[0], image=data, ext=name.split(".")[1]) for name, data in media.items()]  # fmt: skip
    write_shard(tmp_path / "shards" / "00000.tar", shard)
    read = MediaFileReader(image_size=32, num_frames=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batches = iter_eval_batches(
        [Source(url=str(tmp_path / "shards"))], image_size=32, mean=mean, std=std, batch_size=2,
        num_frames=3,
    )  # fmt: skip
    from_shards = {key: pixels for b in batches for key, pixels in zip(b["key"], b["image"])}
    for name, data in media.items():
        (tmp_path / name).write_bytes(data)
        pixels = normalize_pixels(read(tmp_path / name)[None], mean, std)[0]
        assert torch.equal(pixels, from_shards[name.split(".")[0]]), name
    assert from_shards["clip"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("broken.jpg", b"not an image at all", "undecodable_image"),
        ("empty.png", b"", "empty_file"),
        ("broken.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40, "video"),
        ("missing.jpg", None, "No such file"),
    ],
)
def test_unreadable_files_name_the_file_and_reason(tmp_path, name, data, reason):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UnreadableMedia, match=f"{name}.*{reason}"):
        MediaFileReader(image_size=32)(tmp_path / name)


def test_caption_command_skips_an_unreadable_file_and_exits_1(tmp_path, caption_run, capsys):
    paths = []
    for name, data in {**_media_files(), "broken.jpg": b"garbage"}.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    args = ["caption", "--checkpoint", str(caption_run), "--max-length", "5", "--batch-size", "2"]
    assert main([*args, *paths]) == 1
    out, err = capsys.readouterr()
    lines = dict(line.split("\t") for line in out.splitlines())
    assert set(lines) == {p for p in paths if not p.endswith("broken.jpg")}
    assert all(lines.values())  # a caption each (an untrained model's: any non-empty words)
    assert "broken.jpg" in err and "undecodable_image" in err and "Traceback" not in err
    assert main([*args, *paths[:2]]) == 0


# ---- a model without a caption decoder ---------------------------------------------------------


def test_checkpoint_without_decoder_is_one_clear_error(world, tmp_path, capsys):
    run = _checkpoint(tmp_path, MICRO_MODEL)
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(fmt="PNG"))
    for args in (
        ["eval", "caption", "--checkpoint", str(run), "--data", str(world / "val")],
        ["caption", "--checkpoint", str(run), str(image)],
    ):
        assert main(args) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "has no caption decoder" in captured.err and "Traceback" not in captured.err
        assert len(captured.err.strip().splitlines()) == 1
