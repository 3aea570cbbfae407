"""Classification heads on the frozen backbone's last-block tokens (REFERENCE §2), and reading/writing their weights.

Every head maps (B, 1+N, C) tokens, cls first, to (B, num_classes) logits as `head(norm(pool(tokens)))`. Parameter
names follow the original InternVL classifier (`attn_pooling.*`, `clip_projector.*`, `norm.*`, `head.*`), so the
released `intern_vit_6b_224px_head.pth` and the original full-model training checkpoints load directly. `norm` is a
plain BatchNorm1d; the engine converts it to SyncBatchNorm for distributed training (same keys, same numerics).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from internvit.atomic import atomic_path
from internvit.errors import InternViTError
from internvit.weights.files import RawCheckpoint, download, read_checkpoint
from internvit.weights.keymaps import WRAPPER_KEYS, unwrap
from internvit.weights.tags import HEAD_TAGS

log = logging.getLogger(__name__)

BN_EPS = 1e-6  # head SyncBatchNorm eps (§2); momentum is PyTorch's default 0.1
POOL_LN_EPS = 1e-5  # LayerNorms of the attention-pooling block (§2)
HEAD_INIT_STD = 0.01
_BACKBONE_KEYS = ("blocks.", "patch_embed.", "pos_embed", "cls_token")
_MAX_LISTED = 20


class CrossAttention(nn.Module):
    """Multi-head attention of queries over keys/values; bias-free q/k/v Linears plus separate q/k/v bias vectors."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch default Linear init; the separate biases start at zero (§2)."""
        for linear in (self.q, self.k, self.v, self.proj):
            linear.reset_parameters()
        for bias in (self.q_bias, self.k_bias, self.v_bias):
            nn.init.zeros_(bias)

    def _split(self, x_BLC: torch.Tensor, linear: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        return nn.functional.linear(x_BLC, linear.weight, bias).reshape(B, L, self.num_heads, -1).transpose(1, 2)

    def forward(self, q_BQC: torch.Tensor, k_BNC: torch.Tensor, v_BNC: torch.Tensor) -> torch.Tensor:
        q = self._split(q_BQC, self.q, self.q_bias) * self.scale  # q is scaled before the product, as the original
        k = self._split(k_BNC, self.k, self.k_bias)
        v = self._split(v_BNC, self.v, self.v_bias)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, Q, N): softmax over the keys
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class AttentionPoolingBlock(nn.Module):
    """One query (the mean of all 1+N tokens) attends over all tokens; no residual, no MLP (§2)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.norm1_k = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.norm1_v = nn.LayerNorm(dim, eps=POOL_LN_EPS)
        self.cross_attn = CrossAttention(dim, num_heads, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch default init (LayerNorm ones/zeros, Linear kaiming-uniform), zero q/k/v biases."""
        for norm in (self.norm1_q, self.norm1_k, self.norm1_v):
            norm.reset_parameters()
        self.cross_attn.reset_parameters()

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        query = x_BNC.mean(dim=1, keepdim=True)  # cls token included in the mean
        out = self.cross_attn(self.norm1_q(query), self.norm1_k(x_BNC), self.norm1_v(x_BNC))
        return out.squeeze(1)


class _ProbeHead(nn.Module):
    """Shared tail of every head: BatchNorm1d(feature_dim, eps 1e-6) then Linear(feature_dim -> num_classes)."""

    kind = ""

    def __init__(self, embed_dim: int, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_features = feature_dim
        self.num_classes = num_classes
        self.norm = nn.BatchNorm1d(feature_dim, eps=BN_EPS, momentum=0.1)
        self.head = nn.Linear(feature_dim, num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        """§2 init: BN defaults; Linear weight ~ N(0, 0.01), bias 0 (also materialises a meta-built head)."""
        self.norm.reset_parameters()
        nn.init.normal_(self.head.weight, mean=0.0, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        """The (B, num_features) feature that enters `norm`."""
        raise NotImplementedError

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        if x_BNC.ndim != 3 or x_BNC.shape[-1] != self.embed_dim or x_BNC.shape[1] < 2:
            raise ValueError(f"expected tokens of shape (B, 1+N, {self.embed_dim}), got {tuple(x_BNC.shape)}")
        return self.head(self.norm(self.pool(x_BNC)))


def cls_patch_concat(x_BNC: torch.Tensor) -> torch.Tensor:
    """The paper's probe input: cat(cls token, mean of the N patch tokens), (B, 2C)."""
    return torch.cat([x_BNC[:, 0], x_BNC[:, 1:].mean(dim=1)], dim=-1)


class ClsPatchConcatHead(_ProbeHead):
    """Linear probe on cat(cls token, mean of the N patch tokens): the paper's IN-1K probe and the released head."""

    kind = "cls_patch_concat"

    def __init__(self, embed_dim: int, num_classes: int = 1000) -> None:
        super().__init__(embed_dim, 2 * embed_dim, num_classes)
        self.init_weights()

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return cls_patch_concat(x_BNC)


class AttentionPoolingHead(_ProbeHead):
    """A new, trainable attention-pooling block (out_dim = C) followed by BN + Linear (attn_pooling_probing)."""

    kind = "attention_pooling"

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int = 1000) -> None:
        super().__init__(embed_dim, embed_dim, num_classes)
        self.attn_pooling = AttentionPoolingBlock(embed_dim, num_heads, out_dim=embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.attn_pooling.reset_parameters()

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.attn_pooling(x_BNC)


class ClipProjectorHead(_ProbeHead):
    """The pretrained InternVL-C clip_projector (frozen, always in eval mode) -> 768-d, then BN + Linear.

    The projector's weights come from the backbone checkpoint via `load_clip_projector` (or a saved head file).
    """

    kind = "clip_projector"

    def __init__(self, embed_dim: int, num_classes: int = 1000, clip_dim: int = 768, clip_heads: int = 16) -> None:
        super().__init__(embed_dim, clip_dim, num_classes)
        self.clip_projector = AttentionPoolingBlock(embed_dim, clip_heads, out_dim=clip_dim)
        self.clip_projector.requires_grad_(False)
        self.init_weights()
        self.train()

    def train(self, mode: bool = True) -> ClipProjectorHead:
        """Train BN + Linear only; the frozen clip_projector stays in eval mode."""
        super().train(mode)
        self.clip_projector.eval()
        return self

    def pool(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.clip_projector(x_BNC)

    @torch.no_grad()
    def load_clip_projector(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy the pretrained `clip_projector.*` tensors (the backbone LoadReport.extras) in, strictly."""
        prefix = "clip_projector."
        given = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        own = self.clip_projector.state_dict()
        fix = "load the original InternVL .pth (tag internvit-6b-224px.internvl), which holds the clip_projector"
        if not given:
            raise InternViTError("no clip_projector.* tensors were given", fix=fix)
        problems = [f"missing {prefix}{k}" for k in sorted(set(own) - set(given))]
        problems += [f"unexpected {prefix}{k}" for k in sorted(set(given) - set(own))]
        problems += [
            f"mismatched {prefix}{k}: checkpoint {tuple(v.shape)} vs head {tuple(own[k].shape)}"
            for k, v in sorted(given.items())
            if k in own and v.shape != own[k].shape
        ]
        if problems:
            raise InternViTError(
                "clip_projector tensors do not fit the head (embed_dim "
                f"{self.embed_dim}, out dim {self.num_features}): " + "; ".join(problems),
                fix=f"{fix}; build the head with the backbone's embed_dim",
            )
        self.clip_projector.load_state_dict(given)


HEADS: dict[str, type[_ProbeHead]] = {
    "cls_patch_concat": ClsPatchConcatHead,
    "attention_pooling": AttentionPoolingHead,
    "clip_projector": ClipProjectorHead,
}


def build_head(kind: str, *, embed_dim: int, num_heads: int, num_classes: int) -> nn.Module:
    """Build the head of a CLS_TARGET kind; `num_heads` is the backbone's (used by attention_pooling only)."""
    if kind == "cls_patch_concat":
        return ClsPatchConcatHead(embed_dim, num_classes)
    if kind == "attention_pooling":
        return AttentionPoolingHead(embed_dim, num_heads, num_classes)
    if kind == "clip_projector":
        return ClipProjectorHead(embed_dim, num_classes)
    raise InternViTError(f"unknown head kind {kind!r}", fix=f"use one of {', '.join(HEADS)}")


class _YacsConfigStandIn:
    """Rebuilds the yacs `config` entry of original InternVL training checkpoints as an inert OrderedDict."""

    def __new__(cls, *args: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


def _allow_training_configs() -> AbstractContextManager:
    """Allow-list just `yacs.config.CfgNode` (as the stand-in) so ckpt_epoch_*.pth load with weights_only=True."""
    if not hasattr(torch.serialization, "safe_globals") or torch.__version__ < "2.6":
        return nullcontext()
    return torch.serialization.safe_globals([(_YacsConfigStandIn, "yacs.config.CfgNode")])


def _select_state(obj: object, use_ema: bool, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The head state inside a loaded file: `model_ema` if asked, else the `model`-style wrapper, else the file."""
    if use_ema:
        if not (isinstance(obj, Mapping) and isinstance(obj.get("model_ema"), Mapping)):
            found = ", ".join(sorted(map(str, obj))[:10]) if isinstance(obj, Mapping) else type(obj).__name__
            raise InternViTError(
                f"{source}: no 'model_ema' entry to load (top-level entries: {found})",
                fix="load the raw weights (use_ema=False), or pass a checkpoint saved with EMA on",
            )
        return unwrap(obj["model_ema"]), "model_ema"
    entry = next((k for k in WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), "")
    return unwrap(obj), entry or "state dict"


def _ignore_reason(key: str) -> str | None:
    if key.startswith(_BACKBONE_KEYS):
        return "frozen backbone weights, not part of the head (load them with internvit.weights.load_model)"
    if key.startswith("clip_projector."):
        return "InternVL-C clip_projector, not used by this head"
    return None


def _guess_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """The head kind a state dict was saved from, from its key names and shapes (for error messages)."""
    weight = state.get("head.weight")
    proj = state.get("clip_projector.cross_attn.proj.weight")
    if any(k.startswith("attn_pooling.") for k in state):
        return "attention_pooling"
    # a cls_patch_concat training checkpoint may carry an unused clip_projector too: the head width tells them apart
    if weight is not None and proj is not None and weight.shape[1] == proj.shape[0]:
        return "clip_projector"
    return "cls_patch_concat" if weight is not None else None


def _listing(label: str, items: list[str]) -> list[str]:
    lines = [f"  {label:<11} {item}" for item in items[:_MAX_LISTED]]
    return lines + ([f"  {label:<11} ... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else [])


def _mismatch_error(report: dict, head: nn.Module, state: Mapping[str, torch.Tensor]) -> InternViTError:
    kind = getattr(head, "kind", type(head).__name__)
    lines = [f"{report['source']} ({report['entry']}) does not match the {kind} head:"]
    lines += _listing("mismatched", [f"{k}: checkpoint {c} vs head {h}" for k, c, h in report["mismatched"]])
    lines += _listing("missing", report["missing"]) + _listing("unexpected", report["unexpected"])
    guess, weight = _guess_kind(state), state.get("head.weight")
    looks = (
        f" (it looks like kind {guess!r} with num_classes {weight.shape[0]})" if guess and weight is not None else ""
    )
    return InternViTError(
        "\n".join(lines), fix=f"build the head the file was saved from{looks}, or load with strict=False"
    )


def _read_head_state(source: str | Path, use_ema: bool) -> tuple[RawCheckpoint, dict[str, torch.Tensor], str]:
    """Read a head file safely (weights_only pickles, or safetensors) and pick the head state inside it."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in HEAD_TAGS:
        path = download(*HEAD_TAGS[str(source)])
    if not path.exists():
        raise InternViTError(
            f"no such head checkpoint: {source}",
            fix=f"check the path, or pass {', '.join(HEAD_TAGS)} for the released head (downloaded once)",
        )
    with _allow_training_configs():
        raw = read_checkpoint(path)
    state, entry = _select_state(raw.tensors, use_ema, str(source))
    return raw, state, entry


@dataclass
class HeadFileInfo:
    """What a head file says about the head to build for it (from save_head metadata, else from tensor shapes)."""

    kind: str
    num_classes: int
    class_names: list[str]  # the saved names, else the class indices as strings
    metadata: dict[str, str] = field(default_factory=dict)


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1K's names for a 1000-way head without saved names (the released head), else the indices."""
    if num_classes == 1000:
        from internvit.data.imagenet_meta import imagenet_1k_categories

        return imagenet_1k_categories()
    return [str(i) for i in range(num_classes)]


def read_head_file(source: str | Path, *, use_ema: bool = False) -> HeadFileInfo:
    """Which head (kind, num_classes, class names) a file holds, so that it can be built before loading."""
    raw, state, _ = _read_head_state(source, use_ema)
    meta = dict(raw.metadata)
    kind = meta.get("head_kind") or meta.get("kind") or _guess_kind(state)
    weight = state.get("head.weight")
    if kind not in HEADS or weight is None:
        raise InternViTError(
            f"{source}: cannot tell which head this file holds (kind {kind!r}, has head.weight: {weight is not None})",
            fix="pass a file written by save_head() or the released intern_vit_6b_224px_head.pth",
        )
    num_classes = int(weight.shape[0])
    try:
        names = json.loads(meta["class_names"]) if "class_names" in meta else default_class_names(num_classes)
    except json.JSONDecodeError as e:
        raise InternViTError(f"{source}: metadata class_names is not JSON ({e})", fix="re-save the head") from e
    if not isinstance(names, list) or len(names) != num_classes:
        raise InternViTError(
            f"{source}: metadata class_names is not a list of {num_classes} names", fix="re-save the head with them"
        )
    return HeadFileInfo(kind, num_classes, [str(n) for n in names], meta)


@torch.no_grad()
def load_head_state(
    source: str | Path, head: nn.Module, *, strict: bool = True, use_ema: bool = False
) -> dict[str, object]:
    """Load head weights from the released head .pth, an original training checkpoint, or our safetensors.

    Layouts: {"model": state, ...} (with optional model_ema / optimizer / epoch / yacs config), a bare state dict,
    `module.`-prefixed keys, or save_head() safetensors. Backbone keys of a full-model checkpoint are ignored and
    reported. Strict by default. Returns a report: source, entry, num_loaded, missing, unexpected, mismatched,
    ignored (key -> reason), metadata (safetensors header) and info (top-level scalars such as epoch).
    """
    raw, state, entry = _read_head_state(source, use_ema)
    own = head.state_dict()
    ignored = {k: r for k in state if k not in own and (r := _ignore_reason(k)) is not None}
    # BN's num_batches_tracked has no effect with momentum 0.1, so a file without it is still complete
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and k not in ignored)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in sorted(state.items())
        if k in own and v.shape != own[k].shape
    ]
    top = raw.tensors if isinstance(raw.tensors, Mapping) else {}
    report: dict[str, object] = {
        "source": str(source),
        "entry": entry,
        "num_loaded": 0,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "ignored": ignored,
        "metadata": dict(raw.metadata),
        "info": {k: v for k, v in top.items() if isinstance(v, (int, float, str))},
    }
    if strict and (missing or unexpected or mismatched):
        raise _mismatch_error(report, head, state)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    head.load_state_dict(loadable, strict=False)
    report["num_loaded"] = len(loadable)
    if ignored:
        log.info("head checkpoint %s: ignored %d backbone/clip_projector key(s)", source, len(ignored))
    log.info("loaded %d head tensors from %s (%s)", len(loadable), source, entry)
    return report


def save_head(head: nn.Module, path: str | Path, *, metadata: dict[str, str]) -> Path:
    """Write the head's full state dict (BN running stats included) as safetensors, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InternViTError(f"{path}: head files are written as safetensors", fix="use a .safetensors file name")
    bad = sorted(str(k) for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
        raise InternViTError(
            f"safetensors metadata must map str to str; not so for: {', '.join(bad)}",
            fix="convert values with str() or json.dumps()",
        )
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    header = {"format": "internvit-head", "head_kind": getattr(head, "kind", type(head).__name__), **metadata}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path
