"""The README's main job on a fresh machine, no downloads: generated checkpoint and image -> features, with timings."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from internvit.atomic import write_json
from internvit.classification.config import ClassificationConfig
from internvit.classification.run import run_classify
from internvit.classification.run import run_eval as run_cls_eval
from internvit.classification.run import run_train as run_cls_train
from internvit.data import build_eval_transform, load_image
from internvit.demo.ade20k import make_mini_ade20k
from internvit.demo.imagenet import make_mini_imagenet
from internvit.engine.config import load_config
from internvit.model import build_model, count_params, get_config
from internvit.segmentation.config import SegmentationConfig
from internvit.segmentation.run import run_eval as run_seg_eval
from internvit.segmentation.run import run_segment
from internvit.segmentation.run import run_train as run_seg_train
from internvit.weights import convert_checkpoint, load_model

log = logging.getLogger(__name__)


def make_demo_image(path: Path, size: tuple[int, int] = (160, 120), seed: int = 0) -> Path:
    """A non-square RGB picture (gradient, disc, box) so that resize and crop do real work."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (h, 1)), np.full((h, w), 96.0), np.tile(ramp[::-1], (h, 1))], axis=-1)
    img = Image.fromarray((pixels + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 80, 80), fill=(230, 40, 40))
    draw.rectangle((95, 50, 145, 100), fill=(40, 200, 60))
    img.save(path, quality=95)
    return path


def make_demo_checkpoint(path: Path, preset: str = "debug", seed: int = 0) -> Path:
    """A randomly initialised backbone saved in the original InternVL .pth layout ({'module': state_dict})."""
    torch.manual_seed(seed)
    model = build_model(get_config(preset))
    torch.save({"module": model.state_dict()}, path)
    return path


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run_feature_demo(out_dir: str | Path, preset: str = "debug", seed: int = 0) -> dict:
    """Generate a checkpoint and an image, convert and load it, extract features; save and return a summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    pth = make_demo_checkpoint(out / f"{preset}_internvl_layout.pth", preset, seed)
    meta, timings["convert_s"] = _timed(convert_checkpoint, pth, out / f"{preset}.safetensors", overwrite=True)
    (model, report), timings["load_s"] = _timed(load_model, out / f"{preset}.safetensors")
    model.eval()
    image = load_image(make_demo_image(out / "demo.jpg", seed=seed))
    x = build_eval_transform(model.config.img_size)(image).unsqueeze(0)
    with torch.inference_mode():
        tokens, timings["first_forward_s"] = _timed(model.forward_features, x)  # includes one-off kernel set-up
        timings["forward_s"] = sorted(_timed(model.forward_features, x)[1] for _ in range(5))[2]  # median of 5
        maps = model.get_intermediate_layers(x, [len(model.blocks) // 2 - 1, -1], output="nchw")
    features = {"cls": tokens[:, 0], "patch_mean": tokens[:, 1:].mean(1), "last_map": maps[-1][1]}
    save_file({k: v.contiguous() for k, v in features.items()}, out / "features.safetensors")
    summary = {
        "preset": preset,
        "num_params": count_params(model),
        "checkpoint_sha256": meta["content_sha256"],
        "load_report_ok": report.ok,
        "input": list(x.shape),
        "tokens": list(tokens.shape),
        "intermediate_maps": [list(m.shape) for _, m in maps],
        "cls_norm": round(float(tokens[0, 0].norm()), 4),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    write_json(out / "summary.json", summary)
    return summary


def classification_overrides(paths: dict[str, Path], checkpoint: Path, out: Path) -> list[str]:
    """Settings of the demo probe: the paper recipe, scaled to 240 images (global batch 32, lr raised to match)."""
    settings = {
        "backbone.checkpoint": checkpoint,
        "backbone.img_size": 56,
        "head.num_classes": 10,
        "data.imagenet": paths["in1k"],
        "data.imagenetv2": paths["v2"],
        "data.imagenet_a": paths["a"],
        "data.imagenet_r": paths["r"],
        "data.imagenet_sketch": paths["sketch"],
        "data.num_workers": 0,
        "train.batch_size": 16,
        "train.global_batch": 32,
        "train.base_lr": 1.6,
        "eval.batch_size": 64,
        "output_dir": out,  # last: the evaluation replaces it
    }
    return [f"{k}={v}" for k, v in settings.items()]


def run_classification_demo(out_dir: str | Path, checkpoint: Path, seed: int = 0) -> dict:
    """Generate a mini ImageNet family, train a probe, score the six sets, classify one image."""
    out = Path(out_dir)
    shutil.rmtree(out / "probe", ignore_errors=True)  # the demo always trains afresh
    paths = make_mini_imagenet(out / "data", seed=seed)
    settings = classification_overrides(paths, checkpoint, out / "probe")
    timings = {}
    _, timings["train_s"] = _timed(run_cls_train, load_config(ClassificationConfig, None, settings))
    head = out / "probe" / "head.safetensors"
    eval_settings = [*settings[:-1], f"head.checkpoint={head}", f"output_dir={out / 'probe' / 'eval'}"]
    rows, timings["eval_s"] = _timed(run_cls_eval, load_config(ClassificationConfig, None, eval_settings))
    image = sorted((paths["in1k"] / "val" / "n01443537").iterdir())[0]
    predictions = run_classify([str(image)], backbone=str(checkpoint), head=str(head))
    commands = [
        "internvit cls train " + " ".join(settings),
        "internvit cls eval " + " ".join(eval_settings),
        f"internvit classify {image} --backbone {checkpoint} --head {head}",
    ]
    return {"results": rows, "classify": predictions[0], "timings_s": timings, "commands": commands}


def segmentation_overrides(data: Path, checkpoint: Path, out: Path, crop: int = 224) -> list[str]:
    """The linear-probe protocol scaled to the debug backbone: crop 224 instead of 504, 30 iterations, lr raised."""
    settings = {
        "backbone.checkpoint": checkpoint,
        "backbone.out_indices": "[3]",
        "backbone.precision": "fp32",
        "data.root": data,
        "data.crop": crop,  # the backbone resolution, resize scales and sliding windows follow it
        "data.num_workers": 0,
        "train.iters": 30,
        "train.warmup_iters": 5,
        "train.batch_size": 4,
        "train.global_batch": 8,
        "train.lr": 0.02,
        "train.eval_every": 30,
        "output_dir": out,  # last: the evaluation replaces it
    }
    return [f"{k}={v}" for k, v in settings.items()]


def run_segmentation_demo(out_dir: str | Path, checkpoint: Path, seed: int = 0) -> dict:
    """Generate a mini ADE20K, train a linear probe, evaluate it with sliding windows, segment one image."""
    out = Path(out_dir)
    shutil.rmtree(out / "seg", ignore_errors=True)
    data = make_mini_ade20k(out / "ade", seed=seed)
    settings = segmentation_overrides(data, checkpoint, out / "seg")
    timings = {}
    _, timings["train_s"] = _timed(run_seg_train, load_config(SegmentationConfig, None, settings))
    best = out / "seg" / "best.safetensors"
    eval_settings = [*settings[:-1], f"head.checkpoint={best}", f"output_dir={out / 'seg' / 'eval'}"]
    rows, timings["eval_s"] = _timed(run_seg_eval, load_config(SegmentationConfig, None, eval_settings))
    image = sorted((data / "images" / "validation").iterdir())[0]
    segmented = run_segment([str(image)], checkpoint=str(best), out_dir=str(out / "seg" / "segment"))[0]
    commands = [
        "internvit seg train " + " ".join(settings),
        "internvit seg eval " + " ".join(eval_settings),
        f"internvit segment {image} --checkpoint {best} --out {out / 'seg' / 'segment'}",
    ]
    return {"results": rows, "segment": segmented, "timings_s": timings, "commands": commands}


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0) -> dict:
    """The whole main job on built-in defaults: backbone features, classification, then segmentation."""
    out = Path(out_dir)
    features = run_feature_demo(out, "debug", seed)
    classification = run_classification_demo(out, out / "debug.safetensors", seed)
    segmentation = run_segmentation_demo(out, out / "debug.safetensors", seed)
    return {"features": features, **classification, "segmentation": segmentation}
