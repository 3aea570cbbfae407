"""Scoring heads on the six ImageNet test sets (or a custom val split), each image exactly once across all ranks.

See docs/protocol.md §3.2, §3.5. A custom set (data.custom) is scored like IN-1K val (top-1 / top-5 over its own
classes); its rows name it by its root folder and carry no paper numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from internvit.classification.config import CUSTOM_SET, DataConfig
from internvit.classification.metrics import PAPER_RESULTS_DETAILED, real_hits, restrict_logits, summarize, topk_hits
from internvit.data.custom import CustomSplit
from internvit.data.imagenet import build_dataset, collate_skip_none
from internvit.data.imagenet_meta import load_wnids
from internvit.engine.data import build_eval_loader
from internvit.engine.distributed import DistInfo, all_gather_objects
from internvit.engine.precision import autocast
from internvit.engine.progress import progress

log = logging.getLogger(__name__)
SET_NAMES = {
    "in1k": "ImageNet-1K val",
    "real": "ImageNet-ReaL",
    "v2": "ImageNetV2",
    "a": "ImageNet-A",
    "r": "ImageNet-R",
    "sketch": "ImageNet-Sketch",
}


def dataset_root(data: DataConfig, name: str) -> str:
    return {
        "in1k": data.imagenet,
        "real": data.imagenet,
        "v2": data.imagenetv2,
        "a": data.imagenet_a,
        "r": data.imagenet_r,
        "sketch": data.imagenet_sketch,
        CUSTOM_SET: data.custom,
    }[name]


def imagenet_wnids(data: DataConfig) -> list[str] | None:
    """The IN-1K wnid list (label order) from the train/ folder or LOC_synset_mapping.txt, for mapping A/R classes."""
    root = Path(data.imagenet)
    for source in (root / "train", root / "LOC_synset_mapping.txt"):
        if source.exists():
            return load_wnids(source)
    return None


def build_eval_sets(
    names: list[str], data: DataConfig, transform: Callable, wnids: list[str] | None = None
) -> dict[str, object]:
    """The test sets by name (file indexes only: cheap, so a wrong path fails before the backbone loads)."""
    wnids = wnids or (imagenet_wnids(data) if {"a", "r"} & set(names) else None)
    return {name: build_eval_set(name, data, transform, wnids) for name in names}


def build_train_set(data: DataConfig, transform: Callable):
    """IN-1K train, or the train/ split of data.custom when that is set."""
    if data.custom:
        return CustomSplit(
            data.custom,
            "train",
            classes_file=data.custom_classes or None,
            transform=transform,
            skip_corrupt=data.skip_corrupt,
        )
    return build_dataset("in1k", data.imagenet, split="train", transform=transform, skip_corrupt=data.skip_corrupt)


def build_eval_set(name: str, data: DataConfig, transform: Callable, wnids: list[str] | None):
    if name == CUSTOM_SET:
        return CustomSplit(
            data.custom,
            "val",
            classes_file=data.custom_classes or None,
            transform=transform,
            skip_corrupt=data.skip_corrupt,
        )
    return build_dataset(
        name,
        dataset_root(data, name),
        split="val",
        transform=transform,
        wnids=wnids,
        labels=data.val_labels or None,
        real_json=data.real_json or None,
        skip_corrupt=data.skip_corrupt,
    )


def make_scorer(name: str, dataset) -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], dict]:
    """Per-sample hits for one set: A/R logits restricted to their 200 classes, ReaL against its label sets."""
    mask = getattr(dataset, "class_mask", None) if name in ("a", "r") else None

    def score(head_name: str, logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor) -> dict:
        if mask is not None:
            logits = restrict_logits(logits, mask)
        if name == "real":
            valid, top1, top5 = real_hits(logits, [dataset.real_labels_of(i) or [] for i in idx.tolist()])
            return {"top1": top1, "top5": top5, "valid": valid}
        hits = topk_hits(logits, targets, ks=(1, 5))
        return {"top1": hits[1], "top5": hits[5], "pred": logits.argmax(-1)}  # pred: in the set's class indices

    return score


@torch.no_grad()
def predict_scores(
    *,
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    loader,
    score: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    precision: str,
    device: torch.device,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample scores of every head, gathered from all ranks and ordered by dataset index (each sample once).

    The backbone runs once per batch for all heads. `score(head_name, logits, targets, indices)` returns a dict of
    per-sample tensors (e.g. top-1 / top-5 hits).
    """
    for head in heads.values():
        head.eval()
    local: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in heads}
    indices: list[torch.Tensor] = []
    for batch in loader:
        if batch is None:  # every image of this batch was undecodable and skipped (skip_corrupt)
            continue
        images, targets, idx = batch[0].to(device, non_blocking=True), batch[1], batch[2]
        with autocast(device, precision):
            tokens = backbone.forward_features(images)
            for name, head in heads.items():
                for key, value in score(name, head(tokens).float().cpu(), targets, idx).items():
                    local[name].setdefault(key, []).append(value.cpu())
        indices.append(idx.cpu())
        progress(len(idx))
    mine = {
        "index": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "scores": {n: {k: torch.cat(v) for k, v in d.items()} for n, d in local.items()},
    }
    return _merge_ranks(all_gather_objects(mine))


def _merge_ranks(parts: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    index = torch.cat([p["index"] for p in parts])
    if index.unique().numel() != index.numel():
        raise RuntimeError("a sample was scored twice across ranks")
    order = index.argsort()
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for name in parts[0]["scores"]:
        keys = {k for p in parts for k in p["scores"][name]}
        merged[name] = {
            k: torch.cat([p["scores"][name][k] for p in parts if k in p["scores"][name]])[order] for k in keys
        }
    merged["_index"] = {"index": index[order]}
    return merged


def evaluate_sets(
    *,
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    datasets: dict[str, object],
    dist: DistInfo,
    batch_size: int,
    precision: str,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    per_class: list[dict[str, object]] | None = None,
    confusions: list[dict[str, object]] | None = None,
) -> list[dict[str, object]]:
    """One result row per (set, head): Acc@1, Acc@5, images scored and skipped, beside the paper's linear probe.

    A `per_class` list is extended with each set's per-class rows (see `per_class_rows`), a `confusions` list with
    its most confused class pairs (see `confused_pairs`).
    """
    rows = []
    for name, dataset in datasets.items():
        collate = collate_skip_none if skip_corrupt else None
        loader = build_eval_loader(
            dataset, batch_size=batch_size, dist=dist, num_workers=num_workers, collate_fn=collate
        )
        bar = progress(
            total=len(loader.sampler), desc=f"eval {name}", unit="img", disable=not dist.is_main, leave=False
        )
        scores = predict_scores(
            backbone=backbone,
            heads=heads,
            loader=loader,
            score=make_scorer(name, dataset),
            precision=precision,
            device=dist.device,
            progress=bar.update,
        )
        bar.close()
        scored = scores["_index"]["index"].numel()
        title = SET_NAMES.get(name) or dataset.name  # a custom set: "<root folder>-val"
        for head_name in heads:
            s = scores[head_name]
            summary = summarize(s["top1"], s["top5"], s.get("valid"))
            row = {
                "set": name,
                "name": title,
                "head": head_name,
                "acc1": round(summary["acc1"], 3),
                "acc5": round(summary["acc5"], 3),
                "num_images": summary["num_images"],
                "skipped": len(dataset) - scored,
            }
            if name in PAPER_RESULTS_DETAILED:
                # the paper's linear probe (6B-224px, cls_patch_concat, 224 px) on this set, for comparison
                row |= {"paper_acc1": PAPER_RESULTS_DETAILED[name][0], "paper_acc5": PAPER_RESULTS_DETAILED[name][1]}
            rows.append(row)
        log.info("%s: %s", title, ", ".join(f"{r['head']} {r['acc1']:.2f}" for r in rows[-len(heads) :]))
        if per_class is not None:
            per_class.extend(per_class_rows(name, dataset, scores, list(heads)))
        if confusions is not None:
            confusions.extend(confused_pairs(name, dataset, scores, list(heads)))
    return rows


def confused_pairs(name: str, dataset, scores: dict, heads: list[str], top: int = 20) -> list[dict[str, object]]:
    """The `top` most frequent (true class, predicted class) mistakes of every head on one set, most frequent first
    (none for ReaL, whose images have label sets rather than one class)."""
    rows: list[dict[str, object]] = []
    targets = torch.as_tensor(dataset.targets)[scores["_index"]["index"]]
    for head_name in heads:
        pred = scores[head_name].get("pred")
        if pred is None:
            continue
        wrong = pred != targets
        pairs, counts = torch.stack([targets[wrong], pred[wrong]], 1).unique(dim=0, return_counts=True)
        order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), pairs[i].tolist()))[:top]
        rows += [
            {
                "set": name,
                "head": head_name,
                "true": dataset.class_names[int(pairs[i, 0])],
                "predicted": dataset.class_names[int(pairs[i, 1])],
                "count": int(counts[i]),
            }
            for i in order
        ]
    return rows


def per_class_rows(name: str, dataset, scores: dict, heads: list[str]) -> list[dict[str, object]]:
    """Acc@1 / Acc@5 of every head on each class of one set (by target; classes without scored images left out)."""
    targets = torch.as_tensor(dataset.targets)[scores["_index"]["index"]]
    rows = []
    for head_name in heads:
        s = scores[head_name]
        for c, (folder, display) in enumerate(zip(dataset.classes, dataset.class_names, strict=True)):
            chosen = targets == c
            if not chosen.any():
                continue
            summary = summarize(s["top1"][chosen], s["top5"][chosen])
            rows.append(
                {
                    "set": name,
                    "head": head_name,
                    "index": c,
                    "class": folder,
                    "name": display,
                    "acc1": round(summary["acc1"], 3),
                    "acc5": round(summary["acc5"], 3),
                    "num_images": summary["num_images"],
                }
            )
    return rows
