"""`vlpt` console script: subcommands -> functions; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause; they end in one sentence, not a traceback."""
    from vlpt.config import ConfigError
    from vlpt.data import DataSourceError
    from vlpt.models import UnknownModelError, WeightsError
    from vlpt.train.checkpoint import CheckpointError

    return (
        ConfigError,
        DataSourceError,
        UnknownModelError,
        WeightsError,
        CheckpointError,
        FileNotFoundError,
    )


def cmd_synth(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vlpt.config import ConfigError
    from vlpt.data.synthetic import write_dataset, write_video_dataset

    try:
        if args.video and args.domain != "default":
            raise ValueError(f"--domain {args.domain} draws images only; leave out --video.")
        summary = write_dataset(
            args.out_dir,
            domain=args.domain,
            twins=args.twins,
            seed=args.seed,
            n_train=args.images,
            n_val=args.val,
            n_test=args.test,
            size=args.size,
            workers=args.workers,
            progress=not args.quiet,
        )
        if args.video:
            summary["video"] = write_video_dataset(
                Path(args.out_dir) / "video",
                seed=args.seed,
                n_train=args.video_clips,
                n_val=args.video_val,
                n_test=args.video_test,
                size=args.size,
                num_frames=args.frames,
                fps=args.fps,
                workers=args.workers,
                progress=not args.quiet,
            )
    except ValueError as e:  # the writers name the bad argument in one sentence
        raise ConfigError(str(e)) from None
    print(json.dumps(summary))


def cmd_convert_karpathy(args: argparse.Namespace) -> None:
    from vlpt.data.convert import convert_karpathy

    summary = convert_karpathy(
        args.annotations,
        args.images,
        args.out_dir,
        splits=args.split,
        restval_into_train=args.restval_into_train,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    _print_conversion(summary)


def cmd_convert_msrvtt(args: argparse.Namespace) -> None:
    from vlpt.data.convert import convert_msrvtt

    summary = convert_msrvtt(
        args.annotations,
        args.videos,
        args.out_dir,
        splits=args.split,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    _print_conversion(summary)


def _print_conversion(summary: dict) -> None:
    """The summary as one JSON line on stdout; what was skipped, with examples, on stderr."""
    print(json.dumps(summary))
    if summary["skipped"]:
        print(f"vlpt: {summary['report']}", file=sys.stderr)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from vlpt.config import load_config

    _train_or_plan(load_config(args.config, args.overrides), args)


def cmd_finetune(args: argparse.Namespace) -> None:
    """`vlpt pretrain`, once `init` is known to name readable weights."""
    from vlpt.config import load_config
    from vlpt.train.finetune import require_init

    cfg = load_config(args.config, args.overrides)
    require_init(cfg)
    _train_or_plan(cfg, args)


def _train_or_plan(cfg: Any, args: argparse.Namespace) -> None:
    if args.dry_run:
        from vlpt.train.plan import print_plan

        print_plan(cfg, world_size=args.world_size)
        return
    from vlpt.train.loop import pretrain

    pretrain(cfg)


def _load_checkpoint(path: str) -> tuple[Any, Any, Any, Any]:
    """(model on the best device, its tokenizer, the run config, the device) of a checkpoint."""
    from vlpt.models import get_tokenizer
    from vlpt.train.checkpoint import load_trained_model
    from vlpt.train.distributed import pick_device

    device = pick_device()
    model, cfg = load_trained_model(path)
    return model.to(device), get_tokenizer(cfg.model.name), cfg, device


def _run_eval(args: argparse.Namespace, evaluate: Callable[..., dict], **extra: object) -> None:
    """Load a checkpoint, evaluate it on `--data` with `evaluate`, print the result."""
    from vlpt.config import Source

    model, tokenizer, cfg, device = _load_checkpoint(args.checkpoint)
    result = evaluate(
        model,
        tokenizer,
        [Source(url=args.data)],
        batch_size=args.batch_size,
        max_items=args.max_items,
        device=device,
        precision=args.precision,
        num_frames=args.num_frames or cfg.data.num_frames,
        **extra,
    )
    _print_result(result, args.json)


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from vlpt.eval import evaluate_retrieval
    from vlpt.eval.rerank import evaluate_retrieval_reranked

    if args.rerank_k:
        _run_eval(args, evaluate_retrieval_reranked, rerank_k=args.rerank_k)
    else:
        _run_eval(args, evaluate_retrieval)


def cmd_eval_mlm(args: argparse.Namespace) -> None:
    from vlpt.eval.masked import evaluate_mlm

    _run_eval(args, evaluate_mlm)


def cmd_eval_temporal(args: argparse.Namespace) -> None:
    from vlpt.eval import evaluate_temporal

    _run_eval(args, evaluate_temporal)


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    from vlpt.eval import evaluate_zeroshot

    _run_eval(args, evaluate_zeroshot, task=args.task)


def cmd_eval_caption(args: argparse.Namespace) -> None:
    import torch

    from vlpt.eval.caption import evaluate_captions

    torch.manual_seed(args.seed)  # --top-p sampling draws from torch's generator
    _run_eval(args, evaluate_captions, **_generation_options(args))


def cmd_caption(args: argparse.Namespace) -> int:
    """`path<TAB>caption` per readable input on stdout, unreadable ones on stderr; 1 if any."""
    import torch

    from vlpt.apps.caption import caption_files

    model, tokenizer, cfg, device = _load_checkpoint(args.checkpoint)
    torch.manual_seed(args.seed)
    results = caption_files(
        model,
        tokenizer,
        args.paths,
        batch_size=args.batch_size,
        num_frames=args.num_frames or cfg.data.num_frames,
        device=device,
        precision=args.precision,
        **_generation_options(args),
    )
    failed = 0
    for result in results:
        if result.error is not None:
            failed += 1
            print(f"vlpt: {result.error}; skipped", file=sys.stderr)
        else:
            print(f"{result.path}\t{result.caption}", flush=True)
    return 1 if failed else 0


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """`GenerationConfig` fields from --beam-size, --top-p and --max-length."""
    options: dict[str, Any] = {"num_beams": args.beam_size}
    if args.top_p:
        options.update(do_sample=True, top_p=args.top_p)
    if args.max_length:
        options["max_new_tokens"] = args.max_length
    return options


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, dict):  # a breakdown: one line per entry
            print(f"{key:>16}")
            for name, entry in value.items():
                fields = entry.items() if isinstance(entry, dict) else [("", entry)]
                shown = "  ".join(f"{k} {_fmt(v)}" for k, v in fields)
                print(f"{name:>24}  {shown}")
        else:
            print(f"{key:>16}  {_fmt(value)}")


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_models(args: argparse.Namespace) -> None:
    from vlpt.models import get_model_config, list_models

    for name in list_models():
        print(f"{name:8} {get_model_config(name)['description']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlpt", description="Vision-language pretraining on WebDataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="data set tools").add_subparsers(
        dest="data_command", required=True
    )
    _add_synth(data)
    _add_convert(data)
    _add_pretrain(sub)
    _add_eval(sub)
    _add_caption(sub)
    models = sub.add_parser("models", help="list the registered model architectures")
    models.set_defaults(func=cmd_models)
    return parser


Subparsers = Any  # argparse's _SubParsersAction


def _add_synth(data: Subparsers) -> None:
    synth = data.add_parser("synth", help="write the synthetic world as WebDataset shards")
    synth.add_argument("out_dir", help="output folder; gets train/, val/, test/ (and video/)")
    synth.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    synth.add_argument("--images", type=int, default=20000, help="training images")
    synth.add_argument("--val", type=int, default=1000, help="validation images")
    synth.add_argument(
        "--test", type=int, default=1000, help="test images (unseen colour-shape pairs)"
    )
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument(
        "--domain",
        default="default",
        choices=["default", "novel"],
        help="world variant: novel = shapes and backgrounds the default world never draws "
        "(a held-out domain for fine-tuning), written to OUT_DIR like the default",
    )
    synth.add_argument(
        "--twins",
        action="store_true",
        help="each training image also carries its hard-negative twin (twin.jpg, json "
        "twin_captions: the same scene with one shape changed), for data.twin_pairs=true",
    )
    synth.add_argument(
        "--video",
        action="store_true",
        help="also write video clips to OUT_DIR/video/{train,val,test}",
    )
    synth.add_argument("--video-clips", type=int, default=20000, help="training clips")
    synth.add_argument("--video-val", type=int, default=1000, help="validation clips")
    synth.add_argument(
        "--video-test", type=int, default=1000, help="test clips (unseen colour-shape pairs)"
    )
    synth.add_argument("--frames", type=int, default=16, help="frames per clip")
    synth.add_argument("--fps", type=int, default=8, help="frames per second of the clips")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_synth)


def _add_convert(data: Subparsers) -> None:
    convert = data.add_parser(
        "convert", help="write an evaluation set as WebDataset shards (all captions per item)"
    ).add_subparsers(dest="convert_command", required=True)
    karpathy = convert.add_parser(
        "karpathy", help="COCO / Flickr30k images with Karpathy's splits (dataset_coco.json ...)"
    )
    karpathy.add_argument("out_dir", help="output folder; gets one folder per split")
    karpathy.add_argument(
        "--annotations", required=True, help="dataset_coco.json or dataset_flickr30k.json"
    )
    karpathy.add_argument(
        "--images",
        required=True,
        help="image folder: COCO's root holding train2014/ and val2014/, or flickr30k-images/",
    )
    karpathy.add_argument(
        "--split",
        action="append",
        choices=["train", "val", "test", "restval"],
        help="split to write, repeatable (default: every split in the file)",
    )
    karpathy.add_argument(
        "--restval-into-train", action="store_true", help="write restval images into train"
    )
    karpathy.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    karpathy.add_argument("--quiet", action="store_true", help="no progress bar")
    karpathy.set_defaults(func=cmd_convert_karpathy)
    msrvtt = convert.add_parser("msrvtt", help="MSR-VTT videos (official splits and 1k-A test)")
    msrvtt.add_argument("out_dir", help="output folder; gets one folder per split")
    msrvtt.add_argument(
        "--annotations",
        required=True,
        action="append",
        help="train_val_videodatainfo.json, test_videodatainfo.json, MSRVTT_data.json or "
        "MSRVTT_JSFUSION_test.csv; repeatable",
    )
    msrvtt.add_argument(
        "--videos", required=True, action="append", help="folder of video0.mp4 ...; repeatable"
    )
    msrvtt.add_argument(
        "--split",
        action="append",
        choices=["train", "val", "test", "test1k"],
        help="split to write, repeatable (default: every split the annotations have)",
    )
    msrvtt.add_argument("--shard-size", type=int, default=100, help="videos per shard")
    msrvtt.add_argument("--quiet", action="store_true", help="no progress bar")
    msrvtt.set_defaults(func=cmd_convert_msrvtt)


def _add_pretrain(sub: Subparsers) -> None:
    """`pretrain` and `finetune`: the same loop and arguments; finetune requires init=..."""
    for name, func, helptext, example, overrides in (
        (
            "pretrain",
            cmd_pretrain,
            "pretrain from a config file + key=value overrides",
            "configs/pretrain/synthetic-tiny.yaml",
            "dotted overrides such as train.batch_size=64",
        ),
        (
            "finetune",
            cmd_finetune,
            "fine-tune from init=CHECKPOINT: the pretraining loop, run folder and resume",
            "configs/finetune/synthetic-caption-tiny.yaml",
            "dotted overrides; init=CHECKPOINT is required",
        ),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help=f"YAML config, e.g. {example}")
        p.add_argument("overrides", nargs="*", help=overrides)
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="resolve, open the first shard of each source, print the plan",
        )
        p.add_argument(
            "--world-size",
            type=int,
            default=0,
            help="with --dry-run: ranks to plan for (default: $WORLD_SIZE or 1)",
        )
        p.set_defaults(func=func)


def _add_eval(sub: Subparsers) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", required=True
    )
    for name, func, helptext in (
        ("retrieval", cmd_eval_retrieval, "text<->image recall@1/5/10, multi-caption protocol"),
        ("zeroshot", cmd_eval_zeroshot, "zero-shot classification of synthetic-world attributes"),
        ("temporal", cmd_eval_temporal, "clips: true vs time-reversed caption / clip accuracy"),
        ("mlm", cmd_eval_mlm, "masked-token accuracy of the MLM head, real vs shuffled image"),
        ("caption", cmd_eval_caption, "BLEU-4, CIDEr-D, ROUGE-L, attribute accuracy of captions"),
    ):
        p = ev.add_parser(name, help=helptext)
        p.add_argument(
            "--checkpoint", required=True, help="checkpoint folder (or a run folder: its newest)"
        )
        p.add_argument("--data", required=True, help="shard pattern or folder of .tar shards")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument(
            "--max-items", type=int, default=0, help="evaluate at most this many items (0 = all)"
        )
        p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")
        p.add_argument(
            "--num-frames", type=int, default=0, help="frames per clip (0 = the checkpoint's)"
        )
        if name == "caption":
            _add_generation_args(p)
        if name == "zeroshot":
            p.add_argument("--task", default="shape", choices=["shape", "colour", "action"])
        if name == "retrieval":
            p.add_argument(
                "--rerank-k",
                type=int,
                default=0,
                help="re-score each query's contrastive top K with the ITM head (0 = off)",
            )
        p.set_defaults(func=func)


def _add_caption(sub: Subparsers) -> None:
    cap = sub.add_parser(
        "caption",
        help="print 'path<TAB>caption' for image and video files (exit 1 if one is unreadable)",
    )
    cap.add_argument("paths", nargs="+", metavar="PATH", help="image or video (mp4, webm, ...)")
    cap.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (or a run folder: its newest)"
    )
    cap.add_argument("--batch-size", type=int, default=16)
    cap.add_argument(
        "--num-frames", type=int, default=0, help="frames per video (0 = the checkpoint's)"
    )
    cap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    _add_generation_args(cap)
    cap.set_defaults(func=cmd_caption)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-size", type=int, default=1, help="beam search width (1 = greedy)")
    p.add_argument(
        "--top-p", type=float, default=0.0, help="sample with nucleus P instead (0 = off)"
    )
    p.add_argument(
        "--max-length", type=int, default=0, help="most tokens per caption (0 = context length)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of --top-p sampling")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 2 for an error that stops it, else its own exit status (0 or 1)."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        status = func(args)
    except _user_errors() as e:
        print(f"vlpt: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
