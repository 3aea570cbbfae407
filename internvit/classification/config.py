"""Typed settings of the linear-probe protocol; the defaults are the paper's recipe (docs/protocol.md §4.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from internvit.engine.config import BackboneConfig, check_device, check_range, check_tensorboard

EVAL_SETS = ("in1k", "real", "v2", "a", "r", "sketch")
CUSTOM_SET = "custom"  # the val/ split of data.custom, the only set scored when data.custom is set
HEAD_KINDS = ("cls_patch_concat", "attention_pooling", "clip_projector")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "cls_patch_concat"  # cls_patch_concat | attention_pooling | clip_projector (HEADS)
    num_classes: int = 1000  # must equal the training classes: 1000 for IN-1K; with data.custom, its class count
    checkpoint: str = ""  # released or saved head to start from / evaluate
    use_ema: bool = False  # with a training checkpoint: take its EMA head

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head.kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if self.num_classes < 1:
            raise ValueError("head.num_classes must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    imagenet: str = "data/imagenet-1k"  # train/ and val/ (+ val.txt or devkit for flat val, real.json)
    val_labels: str = ""  # default: detected next to val/
    real_json: str = ""  # default: <imagenet>/real.json
    imagenetv2: str = "data/imagenetv2"
    imagenet_a: str = "data/imagenet-a"
    imagenet_r: str = "data/imagenet-r"
    imagenet_sketch: str = "data/imagenet-sketch"
    num_workers: int | None = None  # loader processes per training process; default from the CPU count
    skip_corrupt: bool = False  # skip undecodable images (counted in the results) instead of stopping
    # A custom dataset instead of ImageNet: the root of a train/<class>/* + val/<class>/* image tree. When set,
    # `cls train` trains on its train/ and validates on its val/, and `cls eval` scores its val/ (set "custom")
    # instead of the ImageNet sets; head.num_classes must equal its class count.
    custom: str = ""
    # Its class list, a text file (class index = line order): `<folder>` or `<folder><TAB><display name>` per line,
    # `#` comments. Default: <custom>/classes.txt when present, else the sorted train/ folders (data/custom.py).
    custom_classes: str = ""

    def __post_init__(self) -> None:
        if self.custom_classes and not self.custom:
            raise ValueError("data.custom_classes is set but data.custom is not: set data.custom to the dataset root")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 128  # per process and micro-step
    global_batch: int = 1024  # reached with gradient accumulation: batch_size x world_size x accum_steps
    base_lr: float = 0.1  # per lr_ref_batch images: lr = base_lr x global_batch / lr_ref_batch
    lr_ref_batch: int = 512
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    lr_lag_one_step: bool = True  # the original's scheduler order: the lr used at step s is f(s-1)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    clip_grad: float = 5.0  # total-norm clip; 0 = off
    ema: bool = True
    ema_decay: float = 0.998
    sync_bn: bool = True
    seed: int = 0
    eval_every: int = 1  # epochs; evaluates IN-1K val (data.custom: its val/) with the raw and the EMA head

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "global_batch", "lr_ref_batch", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError("train.warmup_epochs must be between 0 and train.epochs")
        check_range("train.base_lr", self.base_lr, low=0, low_open=True)
        for name in ("warmup_lr", "min_lr", "weight_decay", "mixup", "cutmix", "clip_grad"):
            check_range(f"train.{name}", getattr(self, name), low=0)
        for name in ("mixup_prob", "mixup_switch_prob"):
            check_range(f"train.{name}", getattr(self, name), low=0, high=1)
        for name in ("momentum", "label_smoothing", "ema_decay"):
            check_range(f"train.{name}", getattr(self, name), low=0, high=1, high_open=True)


@dataclass(frozen=True)
class EvalConfig:
    # the sets `cls eval` scores; with data.custom only [custom] (its val/), which the default then means
    sets: list[str] = field(default_factory=lambda: list(EVAL_SETS))
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        bad = [s for s in self.sets if s not in (*EVAL_SETS, CUSTOM_SET)]
        if bad:
            raise ValueError(f"eval.sets: unknown set {bad[0]!r} (valid: {', '.join((*EVAL_SETS, CUSTOM_SET))})")


FEATURE_DTYPES = ("bf16", "fp16", "fp32")
KNN_VARIANTS = ("cls", "mean", "cls_mean", "cls4", "cls4_mean")


@dataclass(frozen=True)
class FeaturesConfig:
    """The fast mode's feature cache (`cls extract`, `cls knn`): computed once per image, not once per epoch."""

    out: str = "runs/features"  # the feature folder (manifest.json + <set>/shard_*.safetensors)
    sets: list[str] = field(default_factory=lambda: ["train", "in1k"])  # train and any test sets (or custom)
    shard_size: int = 1024  # images per shard: the unit of resumption and of the split across processes
    dtype: str = "bf16"  # bf16 | fp16 | fp32 storage
    # 0: the training split in one view, the eval transform (center crop); K >= 1: K views through the paper's
    # train transform (RandomResizedCrop + flip), seeded per (image, view); the sweep trains epoch e on view e % K
    views: int = 0

    def __post_init__(self) -> None:
        if self.views < 0:
            raise ValueError(f"features.views must be >= 0, got {self.views}")
        if self.shard_size < 1:
            raise ValueError(f"features.shard_size must be >= 1, got {self.shard_size}")
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"features.dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        bad = [s for s in self.sets if s not in ("train", *EVAL_SETS, CUSTOM_SET)]
        if bad or not self.sets:
            valid = ", ".join(("train", *EVAL_SETS, CUSTOM_SET))
            raise ValueError(f"features.sets: unknown set {bad[0] if bad else '(none)'!r} (valid: {valid})")


@dataclass(frozen=True)
class KnnConfig:
    """Weighted kNN on cached features (DINO's protocol): cosine similarity, votes exp(sim / temperature)."""

    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    variant: str = "cls"  # cls | mean | cls_mean | cls4 | cls4_mean
    chunk: int = 256  # test images per similarity block (memory: chunk x training images)

    def __post_init__(self) -> None:
        if not self.k or min(self.k) < 1:
            raise ValueError(f"knn.k must be a non-empty list of positive ints, got {self.k}")
        check_range("knn.temperature", self.temperature, low=0, low_open=True)
        if self.variant not in KNN_VARIANTS:
            raise ValueError(f"knn.variant must be one of {', '.join(KNN_VARIANTS)}, got {self.variant!r}")
        if self.chunk < 1:
            raise ValueError(f"knn.chunk must be >= 1, got {self.chunk}")


SWEEP_VARIANTS = ("cls", "cls_mean", "cls4", "cls4_mean")
# 13 base learning rates (per 512 images, scaled with the batch as the paper's base_lr), log-spaced around its 0.1
SWEEP_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class SweepConfig:
    """`cls sweep`: a grid of linear heads trained together on the cached features, one pass per epoch."""

    lrs: list[float] = field(default_factory=lambda: list(SWEEP_LRS))
    variants: list[str] = field(default_factory=lambda: list(SWEEP_VARIANTS))
    batchnorm: list[bool] = field(default_factory=lambda: [True, False])  # with and without the paper head's BN
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 1024  # per process
    holdout: int = 10000  # training images held out (seeded) to choose the head on; never the validation set
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"sweep.lrs must be positive learning rates, got {self.lrs}")
        bad = [v for v in self.variants if v not in SWEEP_VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"sweep.variants: unknown {bad[:1] or '(none)'} (valid: {', '.join(SWEEP_VARIANTS)})")
        if not self.batchnorm:
            raise ValueError("sweep.batchnorm must list true and/or false")
        for name in ("epochs", "batch_size", "holdout"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name} must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError("sweep.warmup_epochs must be between 0 and sweep.epochs")


@dataclass(frozen=True)
class ClassificationConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output_dir: str = "runs/classification"
    device: str = "auto"  # auto | cuda | cpu
    tensorboard: bool = (
        False  # metrics also as TensorBoard scalars in output_dir/tensorboard/ (pip install tensorboard)
    )
    RENAMED_FIELDS: ClassVar[dict] = {"train.amp": ("backbone.precision", {"none": "fp32"})}

    def __post_init__(self) -> None:
        check_device(self.device)
        check_tensorboard(self.tensorboard)
        sets = list(self.eval.sets)
        if self.data.custom and sets not in (list(EVAL_SETS), [CUSTOM_SET]):
            raise ValueError(
                f"eval.sets={sets}: with data.custom set, only its val/ split is scored (a custom head has no "
                "ImageNet logits); drop eval.sets or set eval.sets=[custom]"
            )
        if not self.data.custom and CUSTOM_SET in sets:
            raise ValueError("eval.sets names 'custom' but data.custom is not set: set data.custom=ROOT")

    def eval_sets(self) -> list[str]:
        """The sets `cls eval` scores: eval.sets, or just the custom val split when data.custom is set."""
        return [CUSTOM_SET] if self.data.custom else list(self.eval.sets)
