"""Typed settings of the ADE20K protocols; defaults are the paper's linear probe (REFERENCE §5.5-5.7)."""

from __future__ import annotations

from dataclasses import dataclass, field

HEAD_KINDS = ("linear", "upernet")
TEST_RESIZES = ("setr", "keep_ratio")


@dataclass
class SegBackboneConfig:
    checkpoint: str = "internvit-6b-224px"  # file, folder, tag or hub id; "random" = random init (tests, demo)
    preset: str | None = None
    img_size: int = 504  # pos_embed resized once from the checkpoint's grid (16x16 -> 36x36)
    frozen: bool = True
    drop_path_rate: float = 0.0
    out_indices: list[int] = field(default_factory=lambda: [44])
    grad_checkpointing: bool = True  # with_cp=True in every segmentation config (only matters when not frozen)
    # bf16: a frozen backbone is stored in bf16 (the original); a fine-tuned one keeps fp32 master weights and runs
    # under bf16 autocast (the original's DeepSpeed bf16); fp32: no reduced precision at all
    dtype: str = "bf16"
    # the fast inference path, for a frozen backbone only (engine/parallelize.py): null = compile on CUDA only
    compile: bool | None = None
    fp8: bool = False  # e4m3 matmuls with rowwise scales (H100/H200); faster, not bit-faithful: see docs/performance.md


@dataclass
class SegHeadConfig:
    kind: str = "linear"  # linear | upernet
    num_classes: int = 150
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


@dataclass
class SegDataConfig:
    root: str = "data/ade/ADEChallengeData2016"
    crop: int = 504
    img_scale: list[int] = field(default_factory=lambda: [2016, 504])  # ratio-range resize (train), keep-ratio (test)
    test_short: int = 504  # SETR test resize: the short side becomes exactly this
    test_resize: str = "setr"  # setr: short side exactly 504 (full-data configs); keep_ratio: few-shot configs
    fewshot: int = 0  # k for a 1/k subset of the training images; 0 = all
    fewshot_seed: int = 0
    split_file: str = ""  # reuse a subset written by an earlier run
    num_workers: int = 4

    def __post_init__(self) -> None:
        if self.test_resize not in TEST_RESIZES:
            raise ValueError(f"data.test_resize must be one of {TEST_RESIZES}, got {self.test_resize!r}")
        if self.fewshot < 0:
            raise ValueError("data.fewshot must be >= 0")


@dataclass
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

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "global_batch", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")


@dataclass
class SegEvalConfig:
    crop: int = 504
    stride: int = 322


@dataclass
class SegmentationConfig:
    backbone: SegBackboneConfig = field(default_factory=SegBackboneConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    setting: str = "linear_probe"  # which row of the paper's table this run reproduces (PAPER_MIOU key)
    output_dir: str = "runs/segmentation"
    device: str = "auto"
