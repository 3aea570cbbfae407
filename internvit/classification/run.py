"""Entry points of the linear-probe protocol: run_train, run_eval, run_classify (they assemble engine pieces).

Start-up order: everything cheap is checked first (data folders and class counts, the accumulation and steps per
epoch, the resume settings), `config.yaml` is written once those pass, and only then does the backbone load.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from internvit.classification.build import build_backbone, new_head
from internvit.classification.checkpoints import head_metadata, load_head_state, read_head_file, save_head
from internvit.classification.config import CUSTOM_SET, ClassificationConfig, TrainConfig
from internvit.classification.evaluate import build_eval_sets, build_train_set, evaluate_sets
from internvit.classification.heads import build_head
from internvit.classification.recipe import ProbeRecipe, accumulation_steps, run_signature
from internvit.data import build_eval_transform, build_train_transform, load_image
from internvit.data.imagenet import ImageClassificationDataset, collate_skip_none
from internvit.data.imagenet_meta import few
from internvit.data.images import expand_image_inputs
from internvit.engine.checkpoint import open_run
from internvit.engine.data import TrainBatches, resolve_num_workers
from internvit.engine.distributed import (
    DistInfo,
    cleanup_distributed,
    resolve_device,
    save_config,
    seed_everything,
    start_run,
)
from internvit.engine.ema import ModelEma
from internvit.engine.loop import LoopSettings, train
from internvit.engine.parallelize import parallelize
from internvit.engine.plots import plot_confusions, plot_per_class
from internvit.engine.precision import autocast, needs_grad_scaler
from internvit.engine.results import log_done, save_results
from internvit.engine.run_folder import claim_run_folder
from internvit.engine.schedule import StepScheduler, cosine_lr
from internvit.errors import InternViTError
from internvit.weights.files import checkpoint_identity

log = logging.getLogger(__name__)
COMPILE_MIN_IMAGES = 32  # `classify` compiles the backbone (on CUDA) only for at least this many images


@dataclass(frozen=True)
class TrainData:
    """The probe's data, built and checked before any model loads."""

    train_set: object
    batches: TrainBatches
    val_sets: dict[str, object]
    accum: int
    steps_per_epoch: int


def _train_set(cfg: ClassificationConfig) -> ImageClassificationDataset:
    """IN-1K train, or the train/ split of data.custom when that is set, with the training transform."""
    return build_train_set(cfg.data, build_train_transform(cfg.backbone.img_size))


def _check_num_classes(cfg: ClassificationConfig, dataset: ImageClassificationDataset) -> None:
    if dataset.num_classes != cfg.head.num_classes:
        source = f"data.custom={cfg.data.custom}" if cfg.data.custom else "the training set"
        raise InternViTError(
            f"{source} has {dataset.num_classes} classes but head.num_classes={cfg.head.num_classes}",
            fix=f"set head.num_classes={dataset.num_classes}",
        )


def _check_custom_head(cfg: ClassificationConfig, dataset: ImageClassificationDataset) -> None:
    """The head to evaluate on a custom set has its class count and, when its file records them, its classes."""
    _check_num_classes(cfg, dataset)
    saved, here = read_head_file(cfg.head.checkpoint, use_ema=cfg.head.use_ema).classes, dataset.classes
    if saved and saved != here:  # heads saved before the class folders were recorded have none: not checked
        i = next((i for i, (a, b) in enumerate(zip(saved, here, strict=False)) if a != b), None)
        detail = f"class {i} differs: {saved[i]!r} in the head, {here[i]!r} here" if i is not None else "not as many"
        raise InternViTError(
            f"{cfg.head.checkpoint} was trained on the classes {few(saved)}, but data.custom={cfg.data.custom} has "
            f"{few(here)} ({detail})",
            fix="evaluate on the dataset the head was trained on (same classes, same order), "
            "or point data.custom_classes at its classes file",
        )


def _train_data(cfg: ClassificationConfig, dist: DistInfo) -> TrainData:
    """The training set and its batches, the IN-1K (or custom) val set, the accumulation steps and steps per epoch."""
    t = cfg.train
    accum = accumulation_steps(t.global_batch, t.batch_size, dist.world_size)
    train_set = _train_set(cfg)
    train_set.sample_seed = t.seed  # augmentations per (seed, epoch, image): a mid-epoch resume replays them
    _check_num_classes(cfg, train_set)
    batches = TrainBatches(
        train_set,
        batch_size=t.batch_size,
        dist=dist,
        seed=t.seed,
        num_workers=resolve_num_workers(cfg.data.num_workers),
        collate_fn=collate_skip_none if cfg.data.skip_corrupt else None,
    )
    steps_per_epoch = batches.per_epoch // accum
    if steps_per_epoch < 1:
        raise InternViTError(
            f"{len(train_set)} training images give no full step of {t.global_batch}", fix="lower train.global_batch"
        )
    transform = build_eval_transform(cfg.backbone.img_size)
    if cfg.data.custom:
        val_sets = build_eval_sets([CUSTOM_SET], cfg.data, transform)
    else:
        val_sets = build_eval_sets(["in1k"], cfg.data, transform, train_set.classes)
    return TrainData(train_set, batches, val_sets, accum, steps_per_epoch)


def _backbone_and_head(cfg: ClassificationConfig, device: torch.device):
    backbone, source = build_backbone(
        cfg.backbone.checkpoint,
        preset=cfg.backbone.preset,
        img_size=cfg.backbone.img_size,
        device=device,
        seed=cfg.train.seed,
        precision=cfg.backbone.precision,
        compile=cfg.backbone.compile,
        fp8=cfg.backbone.fp8,
    )
    head = new_head(
        cfg.head.kind,
        backbone=backbone,
        num_classes=cfg.head.num_classes,
        extras=getattr(source, "extras", None),
        checkpoint=cfg.head.checkpoint,
        use_ema=cfg.head.use_ema,
        device=device,
    )
    return backbone, head


def _optimisation(head: torch.nn.Module, t: TrainConfig, *, steps_per_epoch: int):
    """SGD (Nesterov) over the trainable head parameters and timm's per-step cosine, both scaled to the global batch."""
    lr_scale = t.global_batch / t.lr_ref_batch  # lr, warmup lr and min lr all scale with it (docs/protocol.md §4.1)
    lr = t.base_lr * lr_scale
    params = [p for p in head.parameters() if p.requires_grad]  # a frozen clip_projector stays out
    optimizer = torch.optim.SGD(params, lr=lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    schedule = functools.partial(
        cosine_lr,
        base_lr=lr,
        total_steps=t.epochs * steps_per_epoch,
        warmup_steps=t.warmup_epochs * steps_per_epoch,
        warmup_lr=t.warmup_lr * lr_scale,
        min_lr=t.min_lr * lr_scale,
    )
    return optimizer, StepScheduler(optimizer, schedule, lag_one_step=t.lr_lag_one_step), lr


def _recipe(cfg: ClassificationConfig, data: TrainData, dist: DistInfo) -> tuple[ProbeRecipe, float]:
    """Backbone and head, data parallelism, optimizer and schedule, EMA: the probe's recipe for the loop."""
    t = cfg.train
    seed_everything(t.seed + dist.rank)
    backbone, head = _backbone_and_head(cfg, dist.device)
    model = parallelize(head, dist=dist, sync_bn=t.sync_bn)
    optimizer, scheduler, lr = _optimisation(head, t, steps_per_epoch=data.steps_per_epoch)
    log.info(
        "global batch %d = %d per process x %d process(es) x %d accumulation step(s); lr = %g x %d / %d = %g",
        *(t.global_batch, t.batch_size, dist.world_size, data.accum, t.base_lr, t.global_batch, t.lr_ref_batch),
        lr,
    )
    evaluate = functools.partial(
        evaluate_sets,
        backbone=backbone,
        datasets=data.val_sets,
        dist=dist,
        batch_size=cfg.eval.batch_size,
        precision=cfg.backbone.precision,
        num_workers=resolve_num_workers(cfg.data.num_workers),
        skip_corrupt=cfg.data.skip_corrupt,
    )
    recipe = ProbeRecipe(
        backbone=backbone,
        head=head,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ModelEma(head, decay=t.ema_decay) if t.ema else None,
        batches=data.batches,
        train=t,
        num_classes=cfg.head.num_classes,
        precision=cfg.backbone.precision,
        steps_per_epoch=data.steps_per_epoch,
        accum=data.accum,
        evaluate=evaluate,
        dist=dist,
    )
    return recipe, lr


def run_train(cfg: ClassificationConfig) -> dict[str, object]:
    """Train a head on frozen features with the paper recipe; resumes from the run folder; saves the heads."""
    t = cfg.train
    dist, run_dir = start_run(cfg.output_dir, cfg.device)
    try:
        claim_run_folder(run_dir, dist)
        data = _train_data(cfg, dist)
        signature = run_signature(
            t,
            cfg.head,
            cfg.backbone.precision,
            # the file, and what shapes its features: a head is never continued on other features
            backbone={
                **checkpoint_identity(cfg.backbone.checkpoint),
                "preset": cfg.backbone.preset,
                "img_size": cfg.backbone.img_size,
            },
            world_size=dist.world_size,
            steps_per_epoch=data.steps_per_epoch,
            accum=data.accum,
        )
        checkpointer, resume = open_run(cfg, run_dir=run_dir, dist=dist, signature=signature)
        recipe, lr = _recipe(cfg, data, dist)
        settings = LoopSettings(
            total_steps=t.epochs * data.steps_per_epoch,
            accum_steps=data.accum,
            eval_every=t.eval_every * data.steps_per_epoch,
            save_every=data.steps_per_epoch,
            clip_grad=t.clip_grad,
            grad_scaler=needs_grad_scaler(cfg.backbone.precision),
            tensorboard=cfg.tensorboard,
        )
        history = train(recipe, settings=settings, checkpointer=checkpointer, resume=resume)
        if dist.is_main:
            train_set = data.train_set
            meta = head_metadata(
                cfg.head.kind,
                recipe.backbone,
                cfg.head.num_classes,
                list(train_set.class_names),
                cfg.backbone.checkpoint,
                classes=list(train_set.classes),
            )
            save_head(recipe.head, run_dir / "head.safetensors", metadata=meta)
            if recipe.ema is not None:
                save_head(recipe.ema.module, run_dir / "head_ema.safetensors", metadata=meta)
            save_results(history, run_dir, "train_history")
            last = history[-1] if history else {}
            scores = ", ".join(
                f"{k.removeprefix('val_acc1_')} {v:.2f}" for k, v in last.items() if k.startswith("val_acc1_")
            )
            log_done("cls train", f"val top-1 {scores or 'not evaluated'} after epoch {last.get('epoch')}", run_dir)
        return {"history": history, "lr": lr, "accum_steps": data.accum}
    finally:
        cleanup_distributed()


def run_eval(cfg: ClassificationConfig) -> list[dict[str, object]]:
    """Score the head (cfg.head.checkpoint) on any subset of the six test sets (or data.custom's val/), one load."""
    if not cfg.head.checkpoint:
        raise InternViTError("no head to evaluate", fix="set head.checkpoint=PATH (e.g. a run's head.safetensors)")
    dist, run_dir = start_run(cfg.output_dir, cfg.device)
    try:
        transform = build_eval_transform(cfg.backbone.img_size)
        datasets = build_eval_sets(cfg.eval_sets(), cfg.data, transform)
        if CUSTOM_SET in datasets:
            _check_custom_head(cfg, datasets[CUSTOM_SET])
        save_config(cfg, run_dir, dist, name="eval_config.yaml")  # never the training run's config.yaml
        backbone, head = _backbone_and_head(cfg, dist.device)
        per_class: list[dict[str, object]] | None = [] if cfg.data.custom else None  # a custom set: per class too
        confusions: list[dict[str, object]] = []
        rows = evaluate_sets(
            backbone=backbone,
            heads={"head": head},
            datasets=datasets,
            dist=dist,
            batch_size=cfg.eval.batch_size,
            precision=cfg.backbone.precision,
            num_workers=resolve_num_workers(cfg.data.num_workers),
            skip_corrupt=cfg.data.skip_corrupt,
            per_class=per_class,
            confusions=confusions,
        )
        if dist.is_main:
            paths = save_results(rows, run_dir, "eval_results")
            if per_class is not None:
                paths += save_results(per_class, run_dir, "eval_per_class")
                paths += _drawn(plot_per_class, per_class, run_dir / "eval_per_class.png", metric="acc1")
            paths += save_results(confusions, run_dir, "eval_confusions")
            for name in dict.fromkeys(r["set"] for r in confusions):
                pairs = [r for r in confusions if r["set"] == name and r["head"] == "head"]
                title = f"{name}: most confused class pairs"
                paths += _drawn(plot_confusions, pairs, run_dir / f"eval_confusions_{name}.png", title=title)
            log.debug("saved %s", ", ".join(str(p) for p in paths))
            log_done("cls eval", ", ".join(f"{r['set']} top-1 {r['acc1']:.2f}" for r in rows), run_dir)
        return rows
    finally:
        cleanup_distributed()


def _drawn(plot, rows: list[dict], path: Path, **kwargs) -> list[Path]:
    """[path] when `plot` drew something there, else []."""
    return [path] if plot(rows, path, **kwargs) is not None else []


@torch.no_grad()
def run_classify(
    images: list[str], *, backbone: str, head: str, preset: str | None = None, topk: int = 5, device: str = "auto"
) -> list[dict[str, object]]:
    """Top-k class names with probabilities for each image (files or folders), from a backbone and a saved head.

    Images are shown upright (EXIF orientation applied); an unreadable one is reported in its result (`error`) and
    the others still classified."""
    paths = expand_image_inputs(images)
    dev = resolve_device(device)
    head_info = read_head_file(head)
    img_size = int(head_info.metadata.get("img_size", 224))
    precision = "bf16" if dev.type == "cuda" else "fp32"  # the protocol's eval numerics on GPUs; fp32 on the CPU
    # compiling pays back its cost only over many images
    compile = dev.type == "cuda" and len(paths) >= COMPILE_MIN_IMAGES
    model, _ = build_backbone(
        backbone, preset=preset, img_size=img_size, device=dev, precision=precision, compile=compile
    )
    probe = build_head(
        head_info.kind, embed_dim=model.embed_dim, num_heads=model.config.num_heads, num_classes=head_info.num_classes
    )
    load_head_state(head, probe)
    probe.to(dev).eval()
    transform = build_eval_transform(img_size)
    names = head_info.class_names
    results = []
    for path in paths:
        try:
            image = load_image(path, exif=True)
        except InternViTError as e:
            log.error("%s", e.message)
            results.append({"image": str(path), "error": e.message})
            continue
        x = transform(image).unsqueeze(0).to(dev)
        with autocast(dev, precision):
            probs = probe(model.forward_features(x)).float().softmax(-1)[0]
        values, idx = probs.topk(min(topk, probs.numel()))
        results.append(
            {
                "image": str(path),
                "top": [
                    {"class": names[i], "index": i, "prob": round(v, 4)}
                    for v, i in zip(values.tolist(), idx.tolist(), strict=True)
                ],
            }
        )
    return results
