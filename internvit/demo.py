"""The README's main job on a fresh machine, no downloads: generated checkpoint and image -> features, with timings."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from internvit.atomic import write_json
from internvit.data import build_eval_transform, load_image
from internvit.model import build_model, count_params, get_config
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


def run_demo(out_dir: str | Path = "runs/demo", preset: str = "debug", seed: int = 0) -> dict:
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
