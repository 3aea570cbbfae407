"""`cls sweep`: a grid of linear heads (learning rates x feature variants x with/without BatchNorm) trained together
on cached features, chosen on a held-out part of the training set, scored on every cached test set.

All heads see the same batches in one pass per epoch; each is its own module with its own SGD parameter group
(the group's `lr_scale` is the head's learning rate), so training them together equals training each alone. The
recipe is the paper's probe (SGD with Nesterov momentum, timm's per-step cosine with warmup, label smoothing)
without mixup, which needs images. The chosen head is saved with its grid point; the best head of the paper's kind
(cls || patch mean with BatchNorm) is also saved as `head.safetensors`, in the format `cls eval` and `classify`
read. Every result of this mode is labelled `mode: fast (cached features)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from internvit.classification.checkpoints import head_metadata, save_head
from internvit.classification.config import ClassificationConfig
from internvit.classification.evaluate import build_eval_sets, make_scorer
from internvit.classification.features import (
    FeatureShards,
    feature_variant,
    load_features,
    read_manifest,
    train_set_names,
)
from internvit.classification.heads import BN_EPS, HEAD_INIT_STD
from internvit.classification.metrics import summarize
from internvit.classification.probing import FAST_MODE
from internvit.engine.checkpoint import Stateful, open_run
from internvit.engine.data import TrainBatches
from internvit.engine.distributed import cleanup_distributed, start_run
from internvit.engine.loop import LoopSettings, train
from internvit.engine.parallelize import parallelize
from internvit.engine.results import log_done, save_results
from internvit.engine.run_folder import claim_run_folder
from internvit.engine.schedule import StepScheduler, cosine_lr
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
STORED = ("cls", "mean", "cls4")
_REEXTRACT = "extract the features again into a new folder (features.out=...)"


class FeatureHead(nn.Module):
    """BatchNorm1d (optional; eps 1e-6 as the paper head) then Linear, on a cached feature vector. With BN on the
    cls || mean variant its state dict is the paper head's (`norm.*`, `head.*`)."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool, seed: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=BN_EPS, momentum=0.1) if batchnorm else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():  # the paper head's init, from this head's own generator
            self.head.weight.normal_(0.0, HEAD_INIT_STD, generator=torch.Generator().manual_seed(seed))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def head_name(variant: str, batchnorm: bool, lr: float) -> str:
    return f"{variant}|{'bn' if batchnorm else 'nobn'}|lr={lr:g}"


class SweepHeads(nn.Module):
    """Every head of the grid; forward gives each head's logits from the stored feature variants."""

    def __init__(
        self, grid: list[tuple[str, bool, float]], dims: dict[str, int], num_classes: int, seed: int = 0
    ) -> None:
        super().__init__()
        self.grid = grid
        # each head's init depends on its (seed, variant, BN) alone: a head starts the same in any grid
        self.heads = nn.ModuleDict(
            {
                str(i): FeatureHead(dims[v], num_classes, bn, zlib.crc32(f"{seed}|{v}|{bn}".encode()))
                for i, (v, bn, _) in enumerate(grid)
            }
        )

    def forward(self, stored: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = {variant: feature_variant(stored, variant) for variant in {v for v, _, _ in self.grid}}
        return [self.heads[str(i)](inputs[variant]) for i, (variant, _, _) in enumerate(self.grid)]


class CachedFeatures(Dataset):
    """Items (stored variants, target) of the cached training features at the given positions, read from the
    memory-mapped shards a batch at a time (`__getitems__`); epoch e reads view e % K when there are K views."""

    def __init__(self, views: list[FeatureShards], positions: torch.Tensor) -> None:
        self.views, self.positions, self.epoch = views, positions, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, items: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.views[self.epoch % len(self.views)].rows(self.positions[torch.as_tensor(items)], STORED)
        return {key: rows[key] for key in STORED}, rows["target"]

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        stored, target = self.__getitems__([i])
        return {key: value[0] for key, value in stored.items()}, target[0]


def as_batch(batch):
    """The collate of `CachedFeatures`: its `__getitems__` returns the batch already stacked."""
    return batch


def holdout_split(num: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded positions (train, held out) of the cached training set; the held-out part chooses the head."""
    if holdout >= num:
        raise InternViTError(
            f"sweep.holdout={holdout} leaves no training image of {num}", fix="lower sweep.holdout (e.g. num / 10)"
        )
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


class SweepRecipe:
    """The sweep's `TrainTask`: the sum of every head's cross-entropy per batch (the heads share nothing)."""

    def __init__(self, *, heads: SweepHeads, model: nn.Module, optimizer, scheduler, batches: TrainBatches, **kw):
        self.heads, self.model, self.optimizer, self.scheduler = heads, model, optimizer, scheduler
        self.train_batches, self.smoothing, self.dist = batches, kw["smoothing"], kw["dist"]
        self.steps_per_epoch, self.evaluate_fn = kw["steps_per_epoch"], kw["evaluate"]

    def batches(self, start_step: int) -> Iterator[Any]:
        return self.train_batches.epochs(start_step, on_epoch=self.train_batches.dataset.set_epoch)

    def begin_step(self, step: int) -> None:
        self.model.train()

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        stored, target = batch
        stored = {k: v.to(self.dist.device, non_blocking=True) for k, v in stored.items()}
        target = target.to(self.dist.device)
        smoothing = self.smoothing
        losses = [F.cross_entropy(each.float(), target, label_smoothing=smoothing) for each in self.model(stored)]
        total = torch.stack(losses).sum()
        return total, {"head_loss": total.detach() / len(losses)}, len(target)

    def after_step(self, step: int) -> None:
        pass

    def log_record(self, step: int, info: dict[str, float]) -> dict[str, Any] | None:
        if (step % self.steps_per_epoch) % 10:
            return None
        return {"epoch": step // self.steps_per_epoch + 1, "step": step, "head_loss": info["head_loss"]}

    def evaluate(self, done: int) -> dict[str, Any]:
        return self.evaluate_fn()

    def summarize(self, done: int, train: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
        return {"epoch": done // self.steps_per_epoch, "train_loss": train["train_loss"], **(evaluation or {})}

    def state_objects(self) -> Mapping[str, Stateful]:
        return {"heads": self.heads}


@torch.no_grad()
def head_logits(heads: SweepHeads, stored: dict[str, torch.Tensor], device, chunk: int = 4096) -> list[torch.Tensor]:
    """Every head's logits (fp32, CPU) on a set of stored features, in chunks."""
    heads.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in heads.grid]
    for start in range(0, len(stored["target"]), chunk):
        batch = {k: stored[k][start : start + chunk].to(device) for k in STORED}
        for i, logits in enumerate(heads(batch)):
            parts[i].append(logits.float().cpu())
    return [torch.cat(p) for p in parts]


def grid_of(cfg: ClassificationConfig) -> list[tuple[str, bool, float]]:
    scale = cfg.sweep.batch_size / cfg.train.lr_ref_batch  # the paper's rule: lr = base_lr x batch / 512
    return [(v, bn, lr * scale) for v in cfg.sweep.variants for bn in cfg.sweep.batchnorm for lr in cfg.sweep.lrs]


def run_sweep(cfg: ClassificationConfig) -> dict[str, list[dict]]:
    """Train the grid, choose on the held-out training images, report the chosen head on every cached test set."""
    root, s = Path(cfg.features.out), cfg.sweep
    manifest = read_manifest(root)
    names = train_set_names(manifest.get("views", 0))
    views = [FeatureShards(root, name, STORED) for name in names]
    if any(not torch.equal(view.index, views[0].index) for view in views[1:]):
        raise InternViTError(f"the views of {root} do not hold the same images in the same order", fix=_REEXTRACT)
    entry = manifest["sets"][names[0]]
    num_classes, embed = entry["num_classes"], manifest["embed_dim"]
    tests = [name for name in cfg.features.sets if name != "train"]
    test_sets = build_eval_sets(tests, cfg.data, transform=None)  # ReaL labels, A/R masks; no images read
    train_pos, held_pos = holdout_split(len(views[0]), s.holdout, s.seed)  # the same images held out of every view
    dist, run_dir = start_run(cfg.output_dir, cfg.device)
    try:
        claim_run_folder(run_dir, dist)
        grid = grid_of(cfg)
        dims = {"cls": embed, "mean": embed, "cls_mean": 2 * embed, "cls4": 4 * embed, "cls4_mean": 5 * embed}
        heads = SweepHeads(grid, dims, num_classes, s.seed).to(dist.device)
        batches = TrainBatches(
            CachedFeatures(views, train_pos), batch_size=s.batch_size, dist=dist, seed=s.seed, collate_fn=as_batch
        )
        steps = batches.per_epoch
        if steps < 1:
            raise InternViTError(
                f"{len(train_pos)} training images are fewer than one batch of {s.batch_size}",
                fix="lower sweep.batch_size",
            )
        groups = [
            {"params": list(heads.heads[str(i)].parameters()), "lr_scale": lr} for i, (_, _, lr) in enumerate(grid)
        ]
        t = cfg.train
        optimizer = torch.optim.SGD(
            groups, lr=1.0, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay
        )
        schedule = functools.partial(
            cosine_lr, base_lr=1.0, total_steps=s.epochs * steps, warmup_steps=s.warmup_epochs * steps
        )
        scheduler = StepScheduler(optimizer, schedule, lag_one_step=t.lr_lag_one_step)
        held = views[0].rows(held_pos)  # chosen on the center crop, or with features.views on view 0
        last: dict[str, list] = {}

        def evaluate() -> dict[str, Any]:
            logits = head_logits(heads, held, dist.device)
            hits = [(each.argmax(1) == held["target"]).float().mean().item() * 100 for each in logits]
            last["acc1"], last["logits"] = hits, logits
            best = max(range(len(grid)), key=lambda i: hits[i])
            return {"best_head": head_name(*grid[best]), "best_holdout_acc1": round(hits[best], 3)}

        recipe = SweepRecipe(
            heads=heads,
            model=parallelize(heads, dist=dist),
            optimizer=optimizer,
            scheduler=scheduler,
            batches=batches,
            smoothing=t.label_smoothing,
            dist=dist,
            steps_per_epoch=steps,
            evaluate=evaluate,
        )
        signature = {
            "sweep": dataclasses.asdict(s),
            "train": [t.momentum, t.nesterov, t.weight_decay, t.label_smoothing, t.lr_ref_batch, t.lr_lag_one_step],
            "features": manifest,
            "world_size": dist.world_size,
        }
        checkpointer, resume = open_run(cfg, run_dir=run_dir, dist=dist, signature=signature)
        settings = LoopSettings(
            total_steps=s.epochs * steps, accum_steps=1, eval_every=steps, save_every=steps, tensorboard=cfg.tensorboard
        )
        history = train(recipe, settings=settings, checkpointer=checkpointer, resume=resume)
        if not dist.is_main:
            return {}
        return _report(cfg, run_dir, heads, grid, last, held, test_sets, manifest, history, dist.device)
    finally:
        cleanup_distributed()


def _report(cfg, run_dir, heads, grid, last, held, test_sets, manifest, history, device) -> dict:
    """The grid and test tables and the head files, from the held-out scores of the final evaluation."""
    root = Path(cfg.features.out)
    holdout_acc1, held_logits = last["acc1"], last["logits"]
    chosen = max(range(len(grid)), key=lambda i: holdout_acc1[i])
    rows = []
    for i, (variant, bn, lr) in enumerate(grid):
        top5 = held_logits[i].topk(min(5, held_logits[i].shape[1]), dim=1).indices
        rows.append(
            {
                "head": head_name(variant, bn, lr),
                "variant": variant,
                "batchnorm": bn,
                "lr": lr,
                "holdout_acc1": round(holdout_acc1[i], 3),
                "holdout_acc5": round((top5 == held["target"][:, None]).any(1).float().mean().item() * 100, 3),
                "chosen": i == chosen,
            }
        )
    save_results(rows, run_dir, "sweep_grid")
    save_results(history, run_dir, "train_history")
    tests = []
    for name, dataset in test_sets.items():
        stored = load_features(root, name)
        logits = head_logits(heads, stored, device)[chosen]
        hits = make_scorer(name, dataset)("sweep", logits, stored["target"], stored["index"])
        summary = summarize(hits["top1"], hits["top5"], hits.get("valid"))
        tests.append(
            {
                "set": name,
                "head": rows[chosen]["head"],
                "acc1": round(summary["acc1"], 3),
                "acc5": round(summary["acc5"], 3),
                "num_images": summary["num_images"],
                "mode": FAST_MODE,
            }
        )
    save_results(tests, run_dir, "sweep_results")
    entry = manifest["sets"][train_set_names(manifest.get("views", 0))[0]]
    shim = types.SimpleNamespace(
        config=types.SimpleNamespace(
            embed_dim=manifest["embed_dim"], num_heads=manifest["num_heads"], img_size=manifest["img_size"]
        )
    )
    paper = [i for i, (v, bn, _) in enumerate(grid) if v == "cls_mean" and bn]
    if paper:  # the best head of the paper's kind, in the files cls eval and classify read
        best = max(paper, key=lambda i: holdout_acc1[i])
        head = heads.heads[str(best)]
        head.kind = "cls_patch_concat"
        meta = head_metadata(
            "cls_patch_concat",
            shim,
            entry["num_classes"],
            entry["class_names"],
            manifest["backbone"],
            classes=entry["classes"],
        )
        meta |= {"sweep_head": rows[best]["head"], "mode": FAST_MODE}
        save_head(head, run_dir / "head.safetensors", metadata=meta)
    chosen_head = heads.heads[str(chosen)]
    variant, bn, lr = grid[chosen]
    chosen_head.kind = f"feature_{variant}" + ("_bn" if bn else "")
    meta = {
        "sweep_head": rows[chosen]["head"],
        "variant": variant,
        "batchnorm": str(bn),
        "lr": str(lr),
        "mode": FAST_MODE,
        "num_classes": str(entry["num_classes"]),
        "class_names": json.dumps(entry["class_names"]),
    }
    save_head(chosen_head, run_dir / "chosen_head.safetensors", metadata=meta)
    best = f"chose {rows[chosen]['head']} (held-out top-1 {rows[chosen]['holdout_acc1']:.2f}; fast mode)"
    log_done("cls sweep", best, run_dir)
    return {"grid": rows, "results": tests, "history": history}
