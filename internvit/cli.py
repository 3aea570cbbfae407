"""`internvit` command line: thin subcommands that dispatch to library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from internvit import __version__
from internvit.classification.config import ClassificationConfig
from internvit.classification.probing import run_extract, run_knn
from internvit.classification.run import run_classify
from internvit.classification.run import run_eval as run_cls_eval
from internvit.classification.run import run_train as run_cls_train
from internvit.classification.sweep import run_sweep
from internvit.demo import run_demo
from internvit.engine.config import load_config, to_dict
from internvit.engine.distributed import release_process_groups, setup_logging
from internvit.engine.loop import EXIT_INTERRUPTED, TrainingInterrupted
from internvit.engine.precision import DTYPES
from internvit.engine.results import format_record, format_table
from internvit.errors import InternViTError
from internvit.info import describe
from internvit.model import PRESETS, InternViT, count_flops, count_params
from internvit.segmentation.build import plan_training
from internvit.segmentation.checkpoints import export_segmentor, with_saved_settings
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.run import run_eval as run_seg_eval
from internvit.segmentation.run import run_segment
from internvit.segmentation.run import run_train as run_seg_train
from internvit.weights import convert_checkpoint
from internvit.weights.tags import DEFAULT_TAGS, HEAD_TAGS, TAGS


def cmd_models(args: argparse.Namespace) -> None:
    if args.tags:
        rows = [
            {
                "tag": t.name,
                "preset": t.preset,
                "source": t.hub_id + (f"/{t.filename}" if t.filename else ""),
                "img_size": t.img_size,
                "mean": t.mean,
                "std": t.std,
            }
            for t in TAGS.values()
        ]
        rows += [  # the released classification head (cls_patch_concat on the 224px model's tokens)
            {"tag": name, "preset": "head", "source": f"{repo}/{filename}", "img_size": 224, "mean": "-", "std": "-"}
            for name, (repo, filename) in HEAD_TAGS.items()
        ]
    else:
        rows = []
        for name, cfg in PRESETS.items():
            with torch.device("meta"):
                params = count_params(InternViT(cfg))
            rows.append(
                {
                    "preset": name,
                    "depth": cfg.depth,
                    "width": cfg.embed_dim,
                    "heads": cfg.num_heads,
                    "norm": cfg.norm_type,
                    "img_size": cfg.img_size,
                    "params": params if args.json else f"{params:,}",
                    "GFLOPs/img": float(f"{count_flops(cfg) / 1e9:.5g}"),
                    "default tag": DEFAULT_TAGS.get(name, "-"),
                }
            )
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


def cmd_convert(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    meta = convert_checkpoint(
        args.src, args.dst, preset=args.preset, dtype=DTYPES.get(args.dtype), overwrite=args.force
    )
    print(
        f"wrote {args.dst} (preset {meta['preset']}, from {meta['source_layout']} layout, "
        f"sha256 {meta['content_sha256'][:16]}..., {time.perf_counter() - start:.1f}s)"
    )


def cmd_info(args: argparse.Namespace) -> None:
    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key in ("bytes_on_disk", "num_backbone_params", "num_params"):
        if key in info:
            info[key] = f"{info[key]:,}"
    if "set_aside" in info:
        info["set_aside"] = f"{len(info['set_aside'])} key(s)" + (
            f", e.g. {info['set_aside'][0]}" if info["set_aside"] else ""
        )
    bad = info["non_finite_tensors"]
    info["non_finite_tensors"] = f"{len(bad)} tensor(s) with NaN / Inf" + (
        f": {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''} (loading refuses this file)" if bad else ""
    )
    for key, value in info.items():
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def cmd_demo(args: argparse.Namespace) -> None:
    demo = run_demo(out_dir=args.out, seed=args.seed)
    print("\n== backbone: debug preset, generated checkpoint -> convert -> strict load -> features ==")
    print(format_table([{"item": k, "value": v} for k, v in demo["features"].items()]))
    print("\n== linear probe on a generated mini ImageNet family (paper recipe, scaled down) ==")
    print("\n".join(demo["commands"]))
    print(format_table(demo["results"]))
    top = demo["classify"]
    print(f"\nclassify {top['image']}:")
    for rank, item in enumerate(top["top"], 1):
        print(f"  {rank}. {item['class']:<20} {100 * item['prob']:6.2f}%")
    print(f"timings (s): {demo['timings_s']}")
    seg = demo["segmentation"]
    print("\n== ADE20K linear probe on a generated mini ADE20K (crop 224 instead of 504, 30 iterations) ==")
    print("\n".join(seg["commands"]))
    print(format_table(seg["results"]))
    print(f"\nsegment {seg['segment']['image']} -> {seg['segment']['mask']}, {seg['segment']['overlay']}")
    for item in seg["segment"]["classes"][:5]:
        print(f"  {item['class']:<20} {100 * item['share']:6.2f}%")
    print(f"timings (s): {seg['timings_s']}; everything is in {args.out}/ (summary.json, probe/, seg/)")


def _classification_config(args: argparse.Namespace):
    return load_config(ClassificationConfig, args.config, args.overrides)


def cmd_cls_train(args: argparse.Namespace) -> None:
    run_cls_train(_classification_config(args))


def cmd_cls_eval(args: argparse.Namespace) -> None:
    rows = run_cls_eval(_classification_config(args))
    if rows:  # rank 0 alone has the rows
        print(format_table(rows))


def _failed_inputs(results: list[dict], what: str) -> None:
    """After every readable input was processed: stop with an error listing the unreadable ones (exit status 2)."""
    failed = [r for r in results if "error" in r]
    if failed:
        listed = "; ".join(r["error"] for r in failed[:3]) + (" ..." if len(failed) > 3 else "")
        raise InternViTError(
            f"{len(failed)} of {len(results)} image(s) could not be {what}: {listed}",
            fix="replace or remove the unreadable files (the results of the others are above)",
        )


def cmd_cls_extract(args: argparse.Namespace) -> None:
    rows = run_extract(_classification_config(args))
    if rows:
        print(format_table(rows))


def cmd_cls_knn(args: argparse.Namespace) -> None:
    rows = run_knn(_classification_config(args))
    if rows:
        print(format_table(rows))


def cmd_cls_sweep(args: argparse.Namespace) -> None:
    out = run_sweep(_classification_config(args))
    if out:
        print(format_table([row for row in out["grid"] if row["chosen"]]))
        print(format_table(out["results"]))


def cmd_classify(args: argparse.Namespace) -> None:
    results = run_classify(
        args.images, backbone=args.backbone, head=args.head, preset=args.preset, topk=args.topk, device=args.device
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" in result:
                print(f"{result['image']}: unreadable ({result['error']})")
                continue
            print(result["image"])
            for rank, top in enumerate(result["top"], 1):
                print(f"  {rank}. {top['class']:<40} {100 * top['prob']:6.2f}%")
    _failed_inputs(results, "classified")


def _segmentation_config(args: argparse.Namespace):
    return load_config(SegmentationConfig, args.config, args.overrides)


def cmd_seg_train(args: argparse.Namespace) -> None:
    summary = run_seg_train(_segmentation_config(args))
    if summary["best"] is not None:  # rank 0 only
        print(f"best: {format_record(summary['best'])}")


def cmd_seg_eval(args: argparse.Namespace) -> None:
    rows = run_seg_eval(_segmentation_config(args))
    if rows:  # rank 0 alone has the rows
        print(format_table(rows))


def cmd_segment(args: argparse.Namespace) -> None:
    results = run_segment(
        args.images, checkpoint=args.checkpoint, backbone=args.backbone, out_dir=args.out, device=args.device
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" in result:
                print(f"{result['image']}: unreadable ({result['error']})")
                continue
            print(f"{result['image']}: {result['mask']}, {result['overlay']}, {result['labels']}, {result['legend']}")
            for item in result["classes"][: args.top]:
                print(f"  {item['class']:<24} {100 * item['share']:6.2f}%")
        print(f"results: {Path(args.out) / 'segment_results.json'}")
    _failed_inputs(results, "segmented")


def cmd_seg_export(args: argparse.Namespace) -> None:
    print(f"wrote {export_segmentor(args.run, args.out)}")


def cmd_plan(args: argparse.Namespace) -> None:
    cfg = _segmentation_config(args)
    if args.nproc < 1 or args.nnodes < 1:
        raise InternViTError("--nproc and --nnodes must be >= 1", fix="e.g. --nproc 8 --nnodes 2")
    world = args.nproc * args.nnodes
    plan = plan_training(cfg.backbone, cfg.head, cfg.train, world_size=world, local_world_size=args.nproc)
    if plan is None:
        raise InternViTError(
            f"cannot tell the preset of {cfg.backbone.checkpoint} without reading its weights",
            fix="name it: backbone.preset=internvit-6b-224px (see internvit models)",
        )
    if args.json:
        print(json.dumps({"settings": plan.settings, "bytes": plan.components, "total": plan.total}, indent=2))
        return
    print(f"memory per GPU: {cfg.train.parallel}, {world} process(es), batch {cfg.train.batch_size} per process")
    print(format_table(plan.rows()))


def _add_config_args(p: argparse.ArgumentParser, kind: str = "classification") -> None:
    p.add_argument("--config", help=f"YAML file of settings over the paper defaults (see configs/{kind}/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="settings that win over the file")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings as YAML and exit (nothing runs)"
    )
    p.set_defaults(config_kind=kind)


def print_config(args: argparse.Namespace) -> None:
    """The settings a config command would run with: defaults, file, overrides and derived fields, as YAML."""
    if args.config_kind == "segmentation":
        cfg = _segmentation_config(args)
        cfg = with_saved_settings(cfg) if args.func is cmd_seg_eval else cfg  # what seg eval takes from the file
    else:
        cfg = _classification_config(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"internvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list presets with parameter counts and GFLOPs (or --tags: released weights)")
    p.add_argument("--tags", action="store_true", help="list named pretrained tags instead of presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert any supported checkpoint to safetensors in our layout")
    p.add_argument("src", help="file, folder, named tag or hub id")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--preset", help="preset to check against (default: detected from the shapes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="layout, preset, dtype and size of a checkpoint")
    p.add_argument("checkpoint", help="file, folder, named tag or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    cls = sub.add_parser("cls", help="linear-probe classification: train / eval (the paper protocol)")
    cls_sub = cls.add_subparsers(dest="cls_command", required=True)
    p = cls_sub.add_parser(
        "train", help="train a probe on frozen features: IN-1K, or data.custom=ROOT (torchrun for several GPUs)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_cls_train)
    p = cls_sub.add_parser(
        "eval", help="score a head on in1k, real, v2, a, r, sketch (or data.custom's val/) with one backbone load"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_cls_eval)
    p = cls_sub.add_parser(
        "extract", help="fast mode: frozen features of features.sets, once per image, into features.out (resumable)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_cls_extract)
    p = cls_sub.add_parser(
        "sweep", help="fast mode: a grid of linear heads on the cached features, chosen on held-out training images"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_cls_sweep)
    p = cls_sub.add_parser("knn", help="fast mode: weighted kNN (k = 10, 20, 100, 200) on the cached features")
    _add_config_args(p)
    p.set_defaults(func=cmd_cls_knn)

    seg = sub.add_parser("seg", help="segmentation (ADE20K or any dataset): train / eval / export")
    seg_sub = seg.add_subparsers(dest="seg_command", required=True)
    p = seg_sub.add_parser("train", help="train a segmentor (configs/segmentation/*.yaml; torchrun for GPUs)")
    _add_config_args(p, "segmentation")
    p.set_defaults(func=cmd_seg_train)
    p = seg_sub.add_parser("export", help="one safetensors file from a run's last checkpoint (sharded or not)")
    p.add_argument("run", help="the run folder (output_dir of seg train)")
    p.add_argument("--out", help="output file (default: RUN/export.safetensors)")
    p.set_defaults(func=cmd_seg_export)
    p = seg_sub.add_parser("eval", help="sliding-window mIoU on the validation split (head.checkpoint=...)")
    _add_config_args(p, "segmentation")
    p.set_defaults(func=cmd_seg_eval)

    p = sub.add_parser("plan", help="memory per GPU of a segmentation training run, without starting it")
    _add_config_args(p, "segmentation")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "segment", help="colour mask, overlay, label-index PNG, legend and classes present, from a trained segmentor"
    )
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a run's best.safetensors (carries its settings)")
    p.add_argument("--backbone", help="backbone checkpoint when the run kept it frozen (default: the run's)")
    p.add_argument("--out", default="segment", help="folder for the PNGs (default: ./segment)")
    p.add_argument("--top", type=int, default=10, help="classes to list per image")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("classify", help="top-5 classes of images, from a backbone and a trained head")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--backbone", required=True, help="backbone checkpoint: file, folder, tag or hub id")
    p.add_argument("--head", required=True, help="head file (a run's head.safetensors, or the released head .pth)")
    p.add_argument("--preset", help="backbone preset (default: detected)")
    p.add_argument("--top", "--topk", dest="topk", type=int, default=5, help="classes to list per image")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("demo", help="the main job on built-in defaults (no downloads)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        if getattr(args, "print_config", False):
            print_config(args)
        else:
            args.func(args)
    except InternViTError as e:
        print(f"internvit: error: {e.message}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"internvit: {e}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("internvit: interrupted", file=sys.stderr)
        return 130
    finally:
        release_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
