"""Typed settings of the segmentation protocols; defaults: the ADE20K linear probe (docs/protocol.md §5.5-5.7)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from internvit.engine.config import BackboneConfig, check_device, check_range, check_tensorboard

HEAD_KINDS = ("linear", "upernet")
TEST_RESIZES = ("setr", "keep_ratio")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class SegBackboneConfig(BackboneConfig):
    img_size: int | None = None  # default: data.crop (pos_embed resized once from the checkpoint's grid: 16 -> 36)
    frozen: bool = True
    drop_path_rate: float = 0.0
    out_indices: list[int] = field(default_factory=lambda: [44])
    grad_checkpointing: bool = True  # with_cp=True in every segmentation config (only matters when not frozen)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError("backbone.drop_path_rate must be in [0, 1)")


@dataclass(frozen=True)
class SegHeadConfig:
    kind: str = "linear"  # linear | upernet
    num_classes: int | None = None  # default: the dataset's class count (150 for ADE20K)
    fpn: bool = False  # the FPN adapter of the UperNet configs (four taps required)
    channels: int = 1536
    aux: bool = False
    aux_index: int = 1  # FPN level feeding the auxiliary FCN head (1 head tuning, 2 full tuning)
    aux_weight: float = 0.4
    avg_non_ignore: bool = False  # mmseg's default divides the CE sum by all pixels, ignored ones included
    checkpoint: str = ""  # a released mmseg checkpoint or one of ours, to evaluate or start from

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head.kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("head.num_classes must be >= 1")
        if self.channels < 1:
            raise ValueError(f"head.channels must be >= 1, got {self.channels}")
        check_range("head.aux_weight", self.aux_weight, low=0)


@dataclass(frozen=True)
class SegDataConfig:
    root: str = "data/ade/ADEChallengeData2016"
    # a classes file (one name per line, optionally `name #rrggbb`) selects the generic layout at `root`:
    # images/<split>/ + annotations/<split>/*.png; empty: ADE20K (ADEChallengeData2016)
    classes: str = ""
    reduce_zero_label: bool | None = None  # raw 0 ignored, v -> v-1; default: True for ADE20K, False otherwise
    ignore_index: int = 255  # label value left out of the loss and the metrics
    train_split: str = "training"  # folder names under images/ and annotations/
    val_split: str = "validation"
    crop: int = 504  # the training crop: backbone.img_size, img_scale, test_short, eval.crop and stride follow it
    img_scale: list[int] | None = None  # ratio-range resize (train), keep-ratio (test); default [4 x crop, crop]
    test_short: int | None = None  # SETR test resize: the short side becomes exactly this; default crop
    test_resize: str = "setr"  # setr: short side exactly 504 (full-data configs); keep_ratio: few-shot configs
    fewshot: int = 0  # k for a 1/k subset of the training images; 0 = all
    fewshot_seed: int = 0
    split_file: str = ""  # reuse a subset written by an earlier run
    num_workers: int | None = None  # loader processes per training process; default from the CPU count

    def __post_init__(self) -> None:
        if self.test_resize not in TEST_RESIZES:
            raise ValueError(f"data.test_resize must be one of {TEST_RESIZES}, got {self.test_resize!r}")
        if self.fewshot < 0:
            raise ValueError("data.fewshot must be >= 0")
        if self.crop < 1 or self.crop % 14:
            raise ValueError(f"data.crop must be a positive multiple of the patch size 14, got {self.crop}")
        if not self.classes and self.reduce_zero_label is False:
            raise ValueError("ADE20K labels are always reduced (raw 0 is 'other'): leave data.reduce_zero_label unset")
        if not 0 <= self.ignore_index <= 65535:
            raise ValueError(f"data.ignore_index must be in [0, 65535], got {self.ignore_index}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class SegTrainConfig:
    iters: int = 80000
    warmup_iters: int = 1500
    batch_size: int = 2  # per process and micro-step
    global_batch: int = 16
    lr: float = 4e-5
    weight_decay: float = 0.0
    layer_decay: float = 1.0
    decay_pos_embed: bool = True  # the original's quirk: pos_embed / cls_token get weight decay
    seed: int = 0
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    # ddp | fsdp; null: fsdp when the backbone trains (sharded fp32 master weights, gradients and AdamW states), ddp
    # when only the heads train
    parallel: str | None = None
    hybrid_shard: bool = False  # fsdp: shard within a node, replicate across nodes
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer states in host memory

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "global_batch", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.parallel not in (None, *PARALLEL):
            raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        check_range("train.lr", self.lr, low=0, low_open=True)
        check_range("train.weight_decay", self.weight_decay, low=0)
        check_range("train.layer_decay", self.layer_decay, low=0, high=1, low_open=True)
        if self.warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be >= 0, got {self.warmup_iters}")


@dataclass(frozen=True)
class SegEvalConfig:
    crop: int | None = None  # sliding-window size; default data.crop
    stride: int | None = None  # default 23/36 of the crop in whole patches: 322 for 504, as the original
    # test-time augmentation (mmseg's MultiScaleFlipAug): image ratios, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], and
    # horizontal flips; the softmax is averaged at the original size. The paper's numbers: [1.0], no flip
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"eval.stride must be >= 1, got {self.stride}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"eval.scales must be a non-empty list of positive ratios, got {self.scales}")


@dataclass(frozen=True)
class SegmentationConfig:
    backbone: SegBackboneConfig = field(default_factory=SegBackboneConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    setting: str = "linear_probe"  # which row of the paper's table this run reproduces (PAPER_MIOU key)
    output_dir: str = "runs/segmentation"
    device: str = "auto"
    tensorboard: bool = (
        False  # metrics also as TensorBoard scalars in output_dir/tensorboard/ (pip install tensorboard)
    )
    RENAMED_FIELDS: ClassVar[dict] = {"backbone.dtype": ("backbone.precision", {})}

    def __post_init__(self) -> None:
        """Derive the resolution fields left unset from data.crop; refuse settings that contradict it."""
        check_device(self.device)
        check_tensorboard(self.tensorboard)
        crop = self.data.crop
        for name, value in (("backbone.img_size", self.backbone.img_size), ("eval.crop", self.eval.crop)):
            if value is not None and value != crop:
                raise ValueError(
                    f"{name}={value} disagrees with data.crop={crop}: set data.crop alone (the others follow it)"
                )
        replace = dataclasses.replace
        object.__setattr__(self, "backbone", replace(self.backbone, img_size=crop))
        data = replace(
            self.data,
            img_scale=self.data.img_scale or [4 * crop, crop],
            test_short=self.data.test_short or crop,
        )
        object.__setattr__(self, "data", data)
        stride = self.eval.stride or max(14, crop * 23 // 36 // 14 * 14)
        if stride > crop:
            raise ValueError(f"eval.stride={stride} exceeds the window (data.crop={crop}): pixels would be skipped")
        object.__setattr__(self, "eval", replace(self.eval, crop=crop, stride=stride))
        parallel = self.train.parallel or ("ddp" if self.backbone.frozen else "fsdp")
        if parallel == "fsdp" and self.backbone.frozen:
            raise ValueError("train.parallel=fsdp shards a trained backbone; a frozen one trains heads only: use ddp")
        if parallel == "ddp" and (self.train.hybrid_shard or self.train.cpu_offload):
            raise ValueError("train.hybrid_shard and train.cpu_offload need train.parallel=fsdp")
        object.__setattr__(self, "train", replace(self.train, parallel=parallel))
