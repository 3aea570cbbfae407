"""Classification heads (docs/protocol.md §2, §1.8-1.9): sizes, numerics by hand, freezing, init, files."""

import math
import sys
import types
from pathlib import Path

import pytest
import torch
from checkpoints import NotATensor, clip_projector, native_sd, save_pth
from conftest import TINY_6B
from safetensors.torch import save_file

from internvit.classification.checkpoints import load_head_state, read_head_file, save_head
from internvit.classification.heads import (
    HEADS,
    AttentionPoolingHead,
    ClipProjectorHead,
    ClsPatchConcatHead,
    build_head,
)
from internvit.errors import InternViTError
from internvit.weights import load_model

C, NUM_HEADS, NUM_CLASSES = 16, 4, 7
KINDS = list(HEADS)


def tokens(batch: int = 3, num_patches: int = 4, dim: int = C, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1 + num_patches, dim, generator=torch.Generator().manual_seed(seed))


def randomized(kind: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A tiny head whose every parameter and BN buffer holds a distinct non-trivial value."""
    head = build_head(kind, embed_dim=C, num_heads=NUM_HEADS, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in head.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(seed + 3)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=gen))
    return head


def head_state(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def assert_state_equal(head: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = head.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------------------------- sizes, shapes


@pytest.mark.parametrize(
    ("kind", "trainable", "frozen"),
    [("cls_patch_concat", 6_413_800, 0), ("attention_pooling", 44_199_400, 0), ("clip_projector", 770_536, 33_207_168)],
)
def test_full_size_parameter_counts_on_meta(kind, trainable, frozen):
    with torch.device("meta"):
        head = build_head(kind, embed_dim=3200, num_heads=25, num_classes=1000)
    assert all(p.is_meta for p in head.parameters())
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in head.parameters() if not p.requires_grad) == frozen


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_in_train_and_eval(kind):
    head = randomized(kind)
    x = tokens()
    assert head.train()(x).shape == (3, NUM_CLASSES)
    assert head.eval()(x).shape == (3, NUM_CLASSES)
    assert head(tokens(batch=1, num_patches=9)).shape == (1, NUM_CLASSES)  # any token count
    with pytest.raises(ValueError, match="expected tokens"):
        head(torch.randn(3, 5, C + 1))


def test_build_head_kinds_and_unknown_kind():
    assert isinstance(build_head("cls_patch_concat", embed_dim=C, num_heads=4, num_classes=3), ClsPatchConcatHead)
    pool = build_head("attention_pooling", embed_dim=C, num_heads=4, num_classes=3)
    assert isinstance(pool, AttentionPoolingHead) and pool.attn_pooling.cross_attn.num_heads == 4
    clip = build_head("clip_projector", embed_dim=C, num_heads=4, num_classes=3)
    assert isinstance(clip, ClipProjectorHead) and clip.clip_projector.cross_attn.num_heads == 16
    assert clip.head.weight.shape == (3, 768)
    with pytest.raises(InternViTError, match="cls_patch_concat, attention_pooling, clip_projector"):
        build_head("cls_token", embed_dim=C, num_heads=4, num_classes=3)


def test_released_head_key_names():
    """§1.9: exactly norm.{weight,bias,running_mean,running_var,num_batches_tracked}, head.{weight,bias}."""
    sd = ClsPatchConcatHead(3, 5).state_dict()
    expected = {f"norm.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(sd) == expected | {"head.weight", "head.bias"}
    assert sd["norm.weight"].shape == (6,) and sd["head.weight"].shape == (5, 6)
    norm = ClsPatchConcatHead(3, 5).norm
    assert norm.eps == 1e-6 and norm.momentum == 0.1 and norm.affine and norm.track_running_stats


# ----------------------------------------------------------------------------------------------- numerics


def bn_eval(f: torch.Tensor, sd: dict[str, torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    return (f - sd["norm.running_mean"]) / torch.sqrt(sd["norm.running_var"] + eps) * sd["norm.weight"] + sd[
        "norm.bias"
    ]


def test_cls_patch_concat_feature_and_logits_by_hand():
    head = randomized("cls_patch_concat").double().eval()
    x = tokens().double()
    seen = []
    head.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    logits = head(x)
    cls, patches = x[:, 0], x[:, 1:]
    feature = torch.cat([cls, patches.sum(1) / patches.shape[1]], dim=1)  # the cls token is not in the mean
    torch.testing.assert_close(seen[0], feature, rtol=0, atol=1e-12)
    sd = head.state_dict()
    expected = bn_eval(feature, sd) @ sd["head.weight"].T + sd["head.bias"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


def hand_layer_norm(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * w + b


def hand_attention_pooling(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int, p: str) -> torch.Tensor:
    """Independent reference: query = mean of ALL tokens, per-head scores scaled by d^-1/2, explicit softmax."""
    B, L, dim = x.shape
    d = dim // num_heads
    q_in = hand_layer_norm(x.mean(1), sd[f"{p}norm1_q.weight"], sd[f"{p}norm1_q.bias"])
    k_in = hand_layer_norm(x, sd[f"{p}norm1_k.weight"], sd[f"{p}norm1_k.bias"])
    v_in = hand_layer_norm(x, sd[f"{p}norm1_v.weight"], sd[f"{p}norm1_v.bias"])
    q = q_in @ sd[f"{p}cross_attn.q.weight"].T + sd[f"{p}cross_attn.q_bias"]
    k = k_in @ sd[f"{p}cross_attn.k.weight"].T + sd[f"{p}cross_attn.k_bias"]
    v = v_in @ sd[f"{p}cross_attn.v.weight"].T + sd[f"{p}cross_attn.v_bias"]
    out = torch.zeros(B, dim, dtype=x.dtype)
    for b in range(B):
        for h in range(num_heads):
            cols = slice(h * d, (h + 1) * d)
            scores = [float((q[b, cols] * k[b, j, cols]).sum()) / math.sqrt(d) for j in range(L)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for j in range(L):
                out[b, cols] += weights[j] / sum(weights) * v[b, j, cols]
    return out @ sd[f"{p}cross_attn.proj.weight"].T + sd[f"{p}cross_attn.proj.bias"]


def test_attention_pooling_block_against_hand_computation():
    head = randomized("attention_pooling").double().eval()
    x = 2.0 * tokens(num_patches=5).double()
    sd = head.state_dict()
    pooled = hand_attention_pooling(sd, x, NUM_HEADS, "attn_pooling.")
    torch.testing.assert_close(head.pool(x), pooled, rtol=0, atol=1e-10)
    expected = bn_eval(pooled, sd) @ sd["head.weight"].T + sd["head.bias"]
    torch.testing.assert_close(head(x), expected, rtol=0, atol=1e-10)


def test_clip_projector_head_against_hand_computation():
    head = randomized("clip_projector").double()
    x = tokens().double()
    sd = head.state_dict()
    pooled = hand_attention_pooling(sd, x, 16, "clip_projector.")
    assert pooled.shape == (3, 768)
    torch.testing.assert_close(head.eval()(x), bn_eval(pooled, sd) @ sd["head.weight"].T + sd["head.bias"])


# ----------------------------------------------------------------------------------------------- clip_projector


def test_clip_projector_stays_frozen_and_in_eval():
    head = ClipProjectorHead(C, NUM_CLASSES).train()
    assert head.training and head.norm.training and head.head.training
    assert not any(m.training for m in head.clip_projector.modules())
    assert not any(p.requires_grad for p in head.clip_projector.parameters())
    head(tokens()).sum().backward()
    assert all(p.grad is None for p in head.clip_projector.parameters())
    assert head.head.weight.grad is not None and head.norm.weight.grad is not None
    head.eval().train(True)
    assert not head.clip_projector.training and head.norm.training


def test_load_clip_projector_from_a_backbone_load_report(tmp_path):
    """End to end: the original .pth layout -> load_model -> LoadReport.extras -> the head."""
    sd = native_sd(TINY_6B) | clip_projector(TINY_6B.embed_dim)
    _, report = load_model(save_pth({"model": sd}, tmp_path / "backbone.pth"))
    head = ClipProjectorHead(TINY_6B.embed_dim, NUM_CLASSES)
    head.load_clip_projector(report.extras)
    for key, value in head.clip_projector.state_dict().items():
        assert torch.equal(value, sd[f"clip_projector.{key}"]), key
    assert not any(p.requires_grad for p in head.clip_projector.parameters())


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("empty", "no clip_projector"),
        ("missing", "missing clip_projector.cross_attn.v_bias"),
        ("wrong_width", r"mismatched clip_projector.norm1_q.weight: checkpoint \(24,\) vs head \(16,\)"),
        ("unexpected", "unexpected clip_projector.cross_attn.extra"),
    ],
)
def test_load_clip_projector_strict_errors(case, match):
    tensors = {"empty": {}, "wrong_width": clip_projector(24)}.get(case, clip_projector(C))
    if case == "missing":
        del tensors["clip_projector.cross_attn.v_bias"]
    if case == "unexpected":
        tensors["clip_projector.cross_attn.extra"] = torch.zeros(1)
    head = ClipProjectorHead(C, NUM_CLASSES)
    before = head_state(head)
    with pytest.raises(InternViTError, match=match):
        head.load_clip_projector(tensors)
    assert_state_equal(head, before)  # nothing was half-loaded


# ----------------------------------------------------------------------------------------------- init


def test_linear_head_and_bn_init():
    head = ClsPatchConcatHead(256, 1000)  # 512,000 weights: std within ~0.3% of 0.01
    w = head.head.weight
    assert abs(w.std().item() - 0.01) < 2e-4 and abs(w.mean().item()) < 1e-4
    assert torch.count_nonzero(head.head.bias) == 0
    norm = head.norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 1) and norm.num_batches_tracked == 0


def test_attention_pooling_default_init():
    head = AttentionPoolingHead(256, 8, 10)
    block = head.attn_pooling
    for name in ("q_bias", "k_bias", "v_bias"):
        assert torch.count_nonzero(getattr(block.cross_attn, name)) == 0, name
    for norm in (block.norm1_q, block.norm1_k, block.norm1_v):
        assert norm.eps == 1e-5 and torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256: U(-1/16, 1/16)
    for linear in (block.cross_attn.q, block.cross_attn.k, block.cross_attn.v, block.cross_attn.proj):
        assert linear.weight.abs().max() <= bound
        assert abs(linear.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert block.cross_attn.q.bias is None and block.cross_attn.proj.bias.abs().max() <= bound
    assert abs(head.head.weight.std().item() - 0.01) < 5e-4 and torch.count_nonzero(head.head.bias) == 0


def test_meta_built_head_materialises_with_init_weights():
    with torch.device("meta"):
        head = AttentionPoolingHead(64, 4, 500)
    head = head.to_empty(device="cpu")
    head.init_weights()
    assert abs(head.head.weight.std().item() - 0.01) < 1e-3 and torch.count_nonzero(head.head.bias) == 0
    assert torch.count_nonzero(head.attn_pooling.cross_attn.k_bias) == 0
    assert torch.all(head.norm.running_var == 1) and torch.all(head.attn_pooling.norm1_v.weight == 1)


# ----------------------------------------------------------------------------------------------- head files


def backbone_keys() -> dict[str, torch.Tensor]:
    return {
        "cls_token": torch.zeros(1, 1, C),
        "pos_embed": torch.zeros(1, 5, C),
        "blocks.0.norm1.weight": torch.ones(C),
    }


def training_checkpoint(model: dict, ema: dict | None = None) -> dict:
    """The original main.py checkpoint: full model state (frozen backbone included) plus training state."""
    ckpt = {
        "model": model,
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.2, "params": [0]}]},
        "lr_scheduler": {"t_initial": 12510, "base_values": [0.2]},
        "max_accuracy": 88.234,
        "epoch": 8,
        "amp": {"scale": 65536.0, "_growth_tracker": 0},
    }
    return ckpt | ({"model_ema": ema} if ema is not None else {})


def prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in sd.items()}


LAYOUTS = {
    "released_head": lambda sd: {"model": sd},  # §1.9
    "bare": lambda sd: sd,
    "bare_module_prefixed": prefixed,
    "model_module_prefixed": lambda sd: {"model": prefixed(sd)},
    "full_training_checkpoint": lambda sd: training_checkpoint(backbone_keys() | clip_projector(C) | sd),
    "state_dict_wrapper": lambda sd: {"state_dict": sd, "epoch": 3},
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["cls_patch_concat", "attention_pooling"])
def test_load_head_state_every_pth_layout(tmp_path, kind, layout):
    sd = head_state(randomized(kind, seed=1))
    path = save_pth(LAYOUTS[layout](sd), tmp_path / "head.pth")
    head = randomized(kind, seed=2)
    report = load_head_state(path, head)
    assert_state_equal(head, sd)
    assert report["num_loaded"] == len(sd) and not (report["missing"] or report["unexpected"] or report["mismatched"])
    if layout == "full_training_checkpoint":
        assert report["entry"] == "model" and report["info"] == {"max_accuracy": 88.234, "epoch": 8}
        assert set(report["ignored"]) == set(backbone_keys()) | set(clip_projector(C))
        assert (
            "backbone" in report["ignored"]["pos_embed"]
            and "clip_projector" in report["ignored"]["clip_projector.cross_attn.q_bias"]
        )


def test_full_checkpoint_of_a_clip_projector_head_loads_its_projector(tmp_path):
    sd = head_state(randomized("clip_projector", seed=1))
    path = save_pth(training_checkpoint(backbone_keys() | sd), tmp_path / "ckpt_epoch_8.pth")
    head = randomized("clip_projector", seed=2)
    report = load_head_state(path, head)
    assert_state_equal(head, sd)
    assert set(report["ignored"]) == set(backbone_keys())


def test_model_ema_is_taken_only_when_asked(tmp_path):
    raw, ema = head_state(randomized("cls_patch_concat", seed=1)), head_state(randomized("cls_patch_concat", seed=5))
    path = save_pth(training_checkpoint(backbone_keys() | raw, ema=ema), tmp_path / "ckpt.pth")
    head = randomized("cls_patch_concat", seed=2)
    assert load_head_state(path, head, use_ema=True)["entry"] == "model_ema"
    assert_state_equal(head, ema)
    assert load_head_state(path, head)["entry"] == "model"
    assert_state_equal(head, raw)
    no_ema = save_pth({"model": raw, "epoch": 1}, tmp_path / "no_ema.pth")
    with pytest.raises(InternViTError, match="no 'model_ema' entry.*epoch, model"):
        load_head_state(no_ema, head, use_ema=True)


def test_original_checkpoint_with_a_yacs_config_loads_safely(tmp_path, monkeypatch):
    """main.py also saves `config` (a yacs CfgNode); it must load with weights_only=True and without yacs."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):  # what yacs' CfgNode pickles as: a dict subclass with two flags in __dict__
        def __init__(self, init: dict) -> None:
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in init.items()})
            self.__dict__["__immutable__"] = True
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__, module.CfgNode = "yacs.config", "CfgNode", CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    sd = head_state(randomized("cls_patch_concat", seed=1))
    config = CfgNode({"MODEL": {"TYPE": "intern_vit_6b", "NUM_CLASSES": NUM_CLASSES}, "TRAIN": {"BASE_LR": 0.2}})
    path = save_pth(training_checkpoint(backbone_keys() | sd) | {"config": config}, tmp_path / "ckpt_best.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    head = randomized("cls_patch_concat", seed=2)
    load_head_state(path, head)
    assert_state_equal(head, sd)


def test_a_file_with_other_objects_is_still_refused(tmp_path):
    path = save_pth({"model": head_state(ClsPatchConcatHead(C, 2)), "obj": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(InternViTError, match="refused to unpickle"):
        load_head_state(path, ClsPatchConcatHead(C, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_save_head_round_trip_is_bit_exact(tmp_path, kind):
    head = randomized(kind, seed=1).train()
    head(tokens())  # running stats and num_batches_tracked move
    expected = head_state(head)
    path = save_head(head, tmp_path / "out" / "head.safetensors", metadata={"run": "probe-1", "epoch": "9"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.safetensors"]  # no temporary file left
    fresh = randomized(kind, seed=2)
    report = load_head_state(path, fresh)
    assert_state_equal(fresh, expected)
    assert report["metadata"] == {"format": "internvit-head", "head_kind": kind, "run": "probe-1", "epoch": "9"}
    x = tokens(seed=4)
    assert torch.equal(head.eval()(x), fresh.eval()(x))


def test_save_head_bad_arguments(tmp_path):
    head = ClsPatchConcatHead(C, 2)
    with pytest.raises(InternViTError, match="safetensors"):
        save_head(head, tmp_path / "head.pth", metadata={})
    with pytest.raises(InternViTError, match="str to str.*epoch"):
        save_head(head, tmp_path / "head.safetensors", metadata={"epoch": 9})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["garbage_pth", "truncated_pth", "truncated_safetensors", "missing"])
def test_unreadable_head_files(tmp_path, case):
    head = ClsPatchConcatHead(C, NUM_CLASSES)
    if case == "garbage_pth":
        path = tmp_path / "head.pth"
        path.write_bytes(b"this is not a checkpoint")
    elif case == "truncated_pth":
        good = save_pth({"model": head_state(head)}, tmp_path / "good.pth")
        path = tmp_path / "head.pth"
        path.write_bytes(good.read_bytes()[:300])
    elif case == "truncated_safetensors":
        good = save_head(head, tmp_path / "good.safetensors", metadata={})
        path = tmp_path / "head.safetensors"
        path.write_bytes(good.read_bytes()[:-40])
    else:
        path = tmp_path / "nowhere" / "head.pth"
    match = "no such head checkpoint" if case == "missing" else "cannot read"
    with pytest.raises(InternViTError, match=match):
        load_head_state(path, head)


def test_wrong_shape_strict_and_lenient(tmp_path):
    sd = head_state(randomized("cls_patch_concat", seed=1, num_classes=1000))
    path = save_pth({"model": sd}, tmp_path / "head.pth")
    head = randomized("cls_patch_concat", seed=2)
    before = head_state(head)
    message = r"mismatched  head.weight: checkpoint \(1000, 32\) vs head \(7, 32\)"
    with pytest.raises(InternViTError, match=message) as err:
        load_head_state(path, head)
    assert "kind 'cls_patch_concat' with num_classes 1000" in str(err.value)
    assert_state_equal(head, before)
    report = load_head_state(path, head, strict=False)
    assert [k for k, _, _ in report["mismatched"]] == ["head.bias", "head.weight"]
    assert torch.equal(head.norm.running_var, sd["norm.running_var"]) and torch.equal(
        head.head.bias, before["head.bias"]
    )


def test_wrong_kind_and_missing_keys(tmp_path):
    pool = head_state(randomized("attention_pooling", seed=1))
    path = save_pth({"model": pool}, tmp_path / "pool.pth")
    with pytest.raises(InternViTError, match=r"unexpected  attn_pooling\.(.|\n)*kind 'attention_pooling'"):
        load_head_state(path, ClsPatchConcatHead(C // 2, NUM_CLASSES))  # norm width 16 = C: only extra keys differ
    partial = {k: v for k, v in head_state(randomized("cls_patch_concat")).items() if k != "norm.running_mean"}
    with pytest.raises(InternViTError, match="missing     norm.running_mean"):
        load_head_state(save_pth(partial, tmp_path / "partial.pth"), ClsPatchConcatHead(C, NUM_CLASSES))


def test_file_without_num_batches_tracked_is_complete(tmp_path):
    sd = head_state(randomized("cls_patch_concat", seed=1))
    del sd["norm.num_batches_tracked"]
    path = tmp_path / "timm_style.safetensors"
    save_file(sd, str(path))
    head = ClsPatchConcatHead(C, NUM_CLASSES)
    assert load_head_state(Path(path), head)["missing"] == []
    assert torch.equal(head.head.weight, sd["head.weight"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrap", ["released", "full_training_checkpoint"])
def test_read_head_file_from_shapes(tmp_path, kind, wrap):
    sd = head_state(randomized(kind, num_classes=11))
    obj = {"model": sd} if wrap == "released" else training_checkpoint(backbone_keys() | clip_projector(C) | sd)
    info = read_head_file(save_pth(obj, tmp_path / "head.pth"))
    assert (info.kind, info.num_classes, info.class_names, info.metadata) == (kind, 11, [str(i) for i in range(11)], {})


def test_read_head_file_from_save_head_metadata(tmp_path):
    head = randomized("attention_pooling", num_classes=3)
    path = save_head(head, tmp_path / "h.safetensors", metadata={"class_names": '["cat", "dog", "eel"]', "x": "1"})
    info = read_head_file(path)
    assert (info.kind, info.num_classes, info.class_names, info.metadata["x"]) == (
        "attention_pooling",
        3,
        ["cat", "dog", "eel"],
        "1",
    )
    bad = save_head(head, tmp_path / "bad.safetensors", metadata={"class_names": '["cat"]'})
    with pytest.raises(InternViTError, match="not a list of 3 names"):
        read_head_file(bad)
    with pytest.raises(InternViTError, match="cannot tell which head"):
        read_head_file(save_pth({"model": {"norm.weight": torch.ones(2)}}, tmp_path / "odd.pth"))


def test_released_head_tag_offline_gives_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    head = build_head("cls_patch_concat", embed_dim=8, num_heads=2, num_classes=1000)
    with pytest.raises(InternViTError, match="Hugging Face Hub") as info:
        load_head_state("internvit-6b-224px.head", head)
    assert "intern_vit_6b_224px_head.pth" in info.value.fix
