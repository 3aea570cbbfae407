"""The fast probing mode: `cls extract` (frozen features once per image) and `cls knn` (weighted kNN on them).

The paper mode (`cls train`) runs the backbone epochs x images times; extraction runs it once per image. Every
result of this mode is labelled `mode: fast (cached features)`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from internvit.classification.build import build_backbone
from internvit.classification.config import ClassificationConfig
from internvit.classification.evaluate import build_eval_sets, build_train_set, make_scorer
from internvit.classification.features import (
    FORMAT_VERSION,
    VARIANTS,
    extract,
    feature_variant,
    knn_scores,
    load_features,
    read_manifest,
    train_set_names,
)
from internvit.classification.metrics import summarize
from internvit.data.transforms import build_eval_transform, build_train_transform
from internvit.engine.data import resolve_num_workers
from internvit.engine.distributed import all_gather_objects, cleanup_distributed, save_config, start_run
from internvit.engine.results import log_done, save_results
from internvit.errors import InternViTError
from internvit.weights.files import checkpoint_identity

log = logging.getLogger(__name__)
FAST_MODE = "fast (cached features)"


def feature_datasets(cfg: ClassificationConfig, transform) -> dict[str, object]:
    """The sets named in features.sets (file indexes only: cheap): the test sets with the eval transform, the
    training split with it too, or as features.views seeded views through the paper's train transform."""
    tests = [name for name in cfg.features.sets if name != "train"]
    datasets: dict[str, object] = {}
    if "train" in cfg.features.sets and cfg.features.views == 0:
        datasets["train"] = build_train_set(cfg.data, transform)
    elif "train" in cfg.features.sets:
        base = build_train_set(cfg.data, build_train_transform(cfg.backbone.img_size))
        base.sample_seed = cfg.train.seed  # view k of image i: the paper transform seeded by (seed, k, i)
        for name in train_set_names(cfg.features.views):
            view = copy.copy(base)
            view.set_epoch(int(name.removeprefix("train.v")))
            datasets[name] = view
    return datasets | build_eval_sets(tests, cfg.data, transform)


def manifest_settings(cfg: ClassificationConfig, transform) -> dict:
    """What the features depend on: a feature folder made with other settings is refused."""
    views = cfg.features.views
    return {
        "format": FORMAT_VERSION,
        "backbone_file": checkpoint_identity(cfg.backbone.checkpoint),
        "backbone": cfg.backbone.checkpoint,
        "preset": cfg.backbone.preset,
        "img_size": cfg.backbone.img_size,
        "precision": cfg.backbone.precision,
        "transform": repr(transform),
        "dtype": cfg.features.dtype,
        "variants": list(VARIANTS),
        "views": views,
        "train_transform": repr(build_train_transform(cfg.backbone.img_size)) if views else None,
        "seed": cfg.train.seed if views else None,
    }


def run_extract(cfg: ClassificationConfig) -> list[dict]:
    """Run the frozen backbone over every image of features.sets once; rows: images, shards and forwards per set."""
    root = Path(cfg.features.out)
    transform = build_eval_transform(cfg.backbone.img_size)
    datasets = feature_datasets(cfg, transform)  # a wrong data path fails here, before the backbone loads
    dist, root = start_run(root, cfg.device)
    try:
        save_config(cfg, root, dist, name="extract_config.yaml")
        backbone, _ = build_backbone(
            cfg.backbone.checkpoint,
            preset=cfg.backbone.preset,
            img_size=cfg.backbone.img_size,
            device=dist.device,
            precision=cfg.backbone.precision,
            compile=cfg.backbone.compile,
            fp8=cfg.backbone.fp8,
        )
        dims = {"embed_dim": backbone.config.embed_dim, "num_heads": backbone.config.num_heads}
        forwards = extract(
            backbone,
            datasets,
            root,
            manifest=manifest_settings(cfg, transform) | dims,
            shard_size=cfg.features.shard_size,
            batch_size=cfg.eval.batch_size,
            num_workers=resolve_num_workers(cfg.data.num_workers),
            dtype=cfg.features.dtype,
            precision=cfg.backbone.precision,
            dist=dist,
        )
        parts = all_gather_objects(forwards)
        totals = {name: sum(part[name][0] for part in parts) for name in forwards}
        skipped = {name: sum(part[name][1] for part in parts) for name in forwards}
        rows = [
            {
                "set": name,
                "images": len(dataset),
                "backbone_forwards": totals[name],  # this run's: 0 for a set already extracted
                "skipped": skipped[name],  # undecodable, under data.skip_corrupt (this run's)
                # the paper mode runs the training split once per epoch (shown on its first view), a test set once
                "paper_mode_forwards": _paper_forwards(name, len(dataset), cfg.train.epochs),
                "mode": FAST_MODE,
            }
            for name, dataset in datasets.items()
        ]
        if dist.is_main:
            save_results(rows, root, "extract_results")
            ran = ", ".join(f"{name} {totals[name]}" for name in datasets)
            log_done("cls extract", f"backbone forwards {ran} (fast mode)", root)
        return rows if dist.is_main else []
    finally:
        cleanup_distributed()


def _paper_forwards(name: str, images: int, epochs: int) -> int:
    if name in ("train", "train.v0"):
        return images * epochs
    return 0 if name.startswith("train.v") else images


def run_knn(cfg: ClassificationConfig) -> list[dict]:
    """Weighted kNN from the cached train features to every cached test set, each test image on one rank."""
    root = Path(cfg.features.out)
    tests = [name for name in cfg.features.sets if name != "train"]
    if not tests:
        raise InternViTError("features.sets names no test set for kNN", fix="e.g. features.sets=[train,in1k]")
    datasets = build_eval_sets(tests, cfg.data, transform=None)  # ReaL labels and A/R masks; no images read
    manifest = read_manifest(root)
    bank = train_set_names(manifest.get("views", 0))[0]  # the neighbours: the center crop, or the first view
    if bank != "train":
        log.warning("cls knn: the training features are augmented views (features.views); the bank is view 0")
    train = load_features(root, bank, ["cls", "mean", "cls4"])
    num_classes = manifest["sets"][bank]["num_classes"]
    dist, out = start_run(cfg.output_dir, cfg.device)
    try:
        save_config(cfg, out, dist, name="knn_config.yaml")
        train_x = feature_variant(train, cfg.knn.variant)
        rows = []
        for name in tests:
            test = load_features(root, name, ["cls", "mean", "cls4"])
            mine = torch.arange(dist.rank, len(test["index"]), dist.world_size)
            scores = knn_scores(
                train_x,
                train["target"],
                feature_variant(test, cfg.knn.variant)[mine],
                num_classes=num_classes,
                ks=cfg.knn.k,
                temperature=cfg.knn.temperature,
                chunk=cfg.knn.chunk,
            )
            score = make_scorer(name, datasets[name])
            hits = {k: score("knn", s, test["target"][mine], test["index"][mine]) for k, s in scores.items()}
            parts = all_gather_objects(hits)
            for k in cfg.knn.k:
                merged = {key: torch.cat([part[k][key] for part in parts]) for key in parts[0][k]}
                summary = summarize(merged["top1"], merged["top5"], merged.get("valid"))
                rows.append(
                    {
                        "set": name,
                        "k": k,
                        "variant": cfg.knn.variant,
                        "temperature": cfg.knn.temperature,
                        "acc1": round(summary["acc1"], 3),
                        "acc5": round(summary["acc5"], 3),
                        "num_images": summary["num_images"],
                        "mode": FAST_MODE,
                    }
                )
        if dist.is_main:
            save_results(rows, out, "knn_results")
            best = max(rows, key=lambda r: r["acc1"])
            log_done("cls knn", f"best top-1 {best['acc1']:.2f} ({best['set']}, k {best['k']}; fast mode)", out)
        return rows if dist.is_main else []
    finally:
        cleanup_distributed()
