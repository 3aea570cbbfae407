"""Classification recipe pieces against timm (the original's implementation): LR schedule, Mixup/CutMix, EMA."""

import functools
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from internvit.classification.recipe import is_log_step
from internvit.engine.ema import ModelEma
from internvit.engine.mixup import MixParams, Mixup, rand_bbox, smoothed_one_hot, soft_target_cross_entropy
from internvit.engine.schedule import StepScheduler, cosine_lr, poly_lr

timm_scheduler = pytest.importorskip("timm.scheduler")
timm_mixup = pytest.importorskip("timm.data.mixup")
timm_loss = pytest.importorskip("timm.loss")
timm_ema = pytest.importorskip("timm.utils.model_ema")

EPOCHS, ITERS, BASE_LR = 10, 7, 0.2


def _optimizer(num_groups: int = 1, lr_scales: tuple[float, ...] = ()) -> torch.optim.Optimizer:
    """SGD over tiny params, one group per param like the original; optional per-group lr_scale keys."""
    groups = []
    for i in range(num_groups):
        group = {"params": [nn.Parameter(torch.zeros(1))], "lr": BASE_LR}
        if i < len(lr_scales):
            group["lr_scale"] = lr_scales[i]
        groups.append(group)
    return torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9, nesterov=True)


def _cosine(**overrides) -> functools.partial:
    """The recipe's schedule for EPOCHS x ITERS steps with one warmup epoch."""
    kwargs = dict(base_lr=BASE_LR, total_steps=EPOCHS * ITERS, warmup_steps=ITERS) | overrides
    return functools.partial(cosine_lr, **kwargs)


def _timm_cosine(opt: torch.optim.Optimizer, warmup_lr: float = 0.0, min_lr: float = 0.0):
    """timm's CosineLRScheduler built exactly as the original's build_scheduler does."""
    return timm_scheduler.CosineLRScheduler(
        opt, t_initial=EPOCHS * ITERS, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=ITERS,
        cycle_limit=1, t_in_epochs=False, warmup_prefix=False,
    )  # fmt: skip


def _lrs_used(opt: torch.optim.Optimizer, sched) -> list[list[float]]:
    """Drive like the original main.py: read the LR each optimizer step runs with, then step_update(epoch*iters+idx)."""
    used = []
    for epoch in range(EPOCHS):
        for idx in range(ITERS):
            used.append([g["lr"] for g in opt.param_groups])
            sched.step_update(epoch * ITERS + idx)
    return used


# ----------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("warmup_lr,min_lr", [(0.0, 0.0), (0.01, 1e-3)])
def test_cosine_lr_equals_timm(warmup_lr, min_lr):
    sched = _timm_cosine(_optimizer(), warmup_lr, min_lr)
    fn = _cosine(warmup_lr=warmup_lr, min_lr=min_lr)
    for t in range(EPOCHS * ITERS + 5):  # past the end too: min_lr
        assert fn(t) == sched._get_lr(t)[0], t
    assert fn(EPOCHS * ITERS + 3) == min_lr


def test_scheduler_reproduces_original_update_order():
    scales = (1.0, 0.5, 0.25)
    timm_opt, our_opt = _optimizer(4, scales), _optimizer(4, scales)  # 4th group has no lr_scale
    expected = _lrs_used(timm_opt, _timm_cosine(timm_opt))
    ours = StepScheduler(our_opt, _cosine())
    got = _lrs_used(our_opt, ours)
    assert got == expected
    fn = _cosine()
    assert got[0][0] == got[1][0] == 0.0  # steps 0 and 1 both run at f(0) = 0
    for s, row in enumerate(got):
        assert row[0] == fn(max(s - 1, 0)) == ours.lr_used_at(s)
        assert row[1:] == [fn(max(s - 1, 0)) * 0.5, fn(max(s - 1, 0)) * 0.25, fn(max(s - 1, 0))]
    assert ours.get_last_lr()[0] == fn(EPOCHS * ITERS - 1)  # the logged lr after step s is f(s)


def test_scheduler_textbook_order():
    opt = _optimizer()
    sched = StepScheduler(opt, _cosine(), lag_one_step=False)
    fn = _cosine()
    got = [row[0] for row in _lrs_used(opt, sched)]
    assert got == [fn(s) for s in range(EPOCHS * ITERS)]
    assert got == [sched.lr_used_at(s) for s in range(EPOCHS * ITERS)]
    assert got[1] > 0.0


def test_cosine_jumps_at_end_of_warmup():
    """docs/protocol.md §4.1: 1251 iters/epoch, 10 epochs, base 0.2 -> ~0.1998 at the last warmup step, then 0.1951."""
    fn = functools.partial(cosine_lr, base_lr=0.2, total_steps=12510, warmup_steps=1251)
    assert fn(1250) == pytest.approx(0.2 * 1250 / 1251, abs=1e-15)
    assert fn(1250) == pytest.approx(0.19984, abs=1e-5)
    assert fn(1251) == pytest.approx(0.1 * (1 + math.cos(math.pi / 10)), abs=1e-15)
    assert fn(1251) == pytest.approx(0.19511, abs=1e-5)
    assert fn(0) == 0.0 and fn(12509) > 0.0 and fn(12510) == 0.0


def test_scheduler_resume_is_exact():
    fn = _cosine()
    opt = _optimizer()
    sched = StepScheduler(opt, fn)
    for s in range(10):
        sched.step_update(s)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    after = []
    for s in range(10, 20):
        after.append(opt.param_groups[0]["lr"])
        sched.step_update(s)
    opt2 = _optimizer()
    resumed = StepScheduler(opt2, fn)
    assert opt2.param_groups[0]["lr"] == fn(0)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    again = []
    for s in range(10, 20):
        again.append(opt2.param_groups[0]["lr"])
        resumed.step_update(s)
    assert again == after and after[0] == fn(9)


def test_scheduler_rejects_bad_state_and_steps():
    sched = StepScheduler(_optimizer(), _cosine())
    with pytest.raises(ValueError, match="lag_one_step"):
        sched.load_state_dict({"last_step": 3, "lag_one_step": False})
    with pytest.raises(ValueError, match="keys"):
        sched.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="step"):
        sched.step_update(-1)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_lr(0, base_lr=0.1, total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        poly_lr(0, base_lr=0.1, total_steps=10, warmup_steps=-1)


def test_poly_lr_mmcv_values():
    fn = functools.partial(poly_lr, base_lr=4e-5, total_steps=80000, warmup_steps=1500)
    assert fn(0) == pytest.approx(4e-5 * 1e-6, rel=1e-9)  # warmup starts at ratio x base
    assert fn(750) == pytest.approx(4e-5 * (1 - 750 / 80000) * (1 - 0.5 * (1 - 1e-6)), rel=1e-12)
    assert fn(1500) == pytest.approx(4e-5 * (1 - 1500 / 80000), rel=1e-12)  # warmup multiplies the decayed lr
    assert fn(79999) == pytest.approx(4e-5 / 80000, rel=1e-9)
    assert fn(80000) == 0.0
    no_warm = functools.partial(poly_lr, base_lr=1.0, total_steps=10, power=2.0, min_lr=0.1)
    assert no_warm(5) == pytest.approx(0.9 * 0.25 + 0.1)


# ------------------------------------------------------------------------------------------------------ mixup

B, C, H, W, NUM_CLASSES = 6, 3, 9, 12, 10


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randint(0, NUM_CLASSES, (B,), generator=g)


def _timm_0_9_12_rand_bbox(img_shape, lam, margin=0.0, count=None):
    """timm 0.9.12's rand_bbox (the original's pin), written out: both half-sides `cut // 2` (the installed timm
    rounds the high side up)."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = np.random.randint(0 + margin_y, img_h - margin_y, size=count)
    cx = np.random.randint(0 + margin_x, img_w - margin_x, size=count)
    yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the recipe: mixup 0.8 + cutmix 1.0, switch 0.5
        {"cutmix_alpha": 0.0},  # mixup only
        {"mixup_alpha": 0.0},  # cutmix only
        {"correct_lam": False, "prob": 0.6},
        {"label_smoothing": 0.0, "switch_prob": 0.9},
    ],
)
def test_mixup_matches_timm_sequence(kwargs, monkeypatch):
    """Same seed -> same draws, images and soft targets as timm, batch after batch, for every path."""
    monkeypatch.setattr(timm_mixup, "rand_bbox", _timm_0_9_12_rand_bbox)
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES) | kwargs
    for seed in range(3):
        np.random.seed(seed)
        ref = timm_mixup.Mixup(mode="batch", **kw)
        ours = Mixup(**kw, seed=seed)
        probe = Mixup(**kw, seed=seed)  # same stream, to see which path each batch took
        paths = set()
        for i in range(12):
            x, y = _batch(seed * 100 + i)
            x_ref, t_ref = ref(x.clone(), y)
            x_ours, t_ours = ours(x, y)
            params = probe.sample_params(H, W)
            paths.add("none" if params.lam == 1.0 else "cutmix" if params.use_cutmix else "mixup")
            assert torch.equal(x_ours, x_ref) and torch.equal(t_ours, t_ref)
            assert t_ours.dtype == torch.float32 and torch.allclose(t_ours.sum(1), torch.ones(B))
    expected = {"cutmix"} if kw["mixup_alpha"] == 0 else {"mixup"} if kw["cutmix_alpha"] == 0 else {"mixup", "cutmix"}
    assert expected <= paths


@pytest.mark.parametrize("raw_lam,box", [(0.7, None), (0.75, (2, 7, 0, 5))])
def test_mixup_external_params_match_timm(raw_lam, box, monkeypatch):
    """Forcing timm's draws to known values gives the same result as our apply() with those values."""
    monkeypatch.setattr(timm_mixup.Mixup, "_params_per_batch", lambda self: (raw_lam, box is not None))
    monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *a, **k: box)
    x, y = _batch()
    ref = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NUM_CLASSES)
    x_ref, t_ref = ref(x.clone(), y)
    # MixParams carries the final lam: for CutMix timm corrects 0.75 to 1 - box area / image area = 1 - 25/108
    params = MixParams(lam=raw_lam) if box is None else MixParams(lam=1 - 25 / 108, use_cutmix=True, box=box)
    x_ours, t_ours = Mixup(num_classes=NUM_CLASSES).apply(x, y, params)
    assert torch.equal(x_ours, x_ref) and torch.equal(t_ours, t_ref)
    assert not torch.equal(x_ours, x)


def test_mixup_by_hand():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    m = Mixup(num_classes=4, label_smoothing=0.1)
    x_mix, t = m.apply(x, y, MixParams(lam=0.25))
    assert torch.allclose(x_mix[:, 0, 0, 0], torch.tensor([2.25, 1.75, 1.25, 0.75]))
    assert t[0].tolist() == pytest.approx([0.25 * 0.925 + 0.75 * 0.025, 0.025, 0.025, 0.25 * 0.025 + 0.75 * 0.925])
    x_cut, t_cut = m.apply(x, y, MixParams(lam=0.75, use_cutmix=True, box=(0, 1, 0, 1)))
    assert x_cut[0, 0].tolist() == [[3.0, 0.0], [0.0, 0.0]] and torch.equal(x, x.clone())  # input untouched
    assert torch.equal(smoothed_one_hot(y, 1000, 0.1).unique(), torch.tensor([0.1 / 1000, 0.9 + 0.1 / 1000]))
    assert torch.equal(m.apply(x, y, MixParams(lam=1.0))[0], x)


class _FixedCentre:
    """Stub RNG: the CutMix box centre is always pixel (0, 0), so the box is clipped by the image corner."""

    def randint(self, low: int, high: int) -> int:
        return 0


def test_cutmix_box_and_lambda_correction():
    assert rand_bbox(_FixedCentre(), 8, 8, 0.75) == (0, 2, 0, 2)  # side 4, clipped to 2x2
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, seed=3)
    ref_rng = np.random.RandomState(3)
    for _ in range(50):
        params = m.sample_params(H, W)
        ref_rng.rand()
        raw = ref_rng.beta(1.0, 1.0)
        yl, yh, xl, xh = rand_bbox(ref_rng, H, W, raw)
        assert params.box == (yl, yh, xl, xh)
        assert params.lam == 1.0 - (yh - yl) * (xh - xl) / (H * W)
    raw_m = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False, seed=3)
    ref_rng = np.random.RandomState(3)
    ref_rng.rand()
    assert raw_m.sample_params(H, W).lam == ref_rng.beta(1.0, 1.0)


def test_mixup_state_resumes_exactly():
    m = Mixup(seed=7)
    for i in range(3):
        m(*_batch(i))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    expected = [m(*_batch(i)) for i in range(3, 6)]
    buf.seek(0)
    resumed = Mixup(seed=123)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for i, (x_e, t_e) in zip(range(3, 6), expected, strict=True):
        x_r, t_r = resumed(*_batch(i))
        assert torch.equal(x_r, x_e) and torch.equal(t_r, t_e)


def test_mixup_bad_inputs():
    x, y = _batch()
    with pytest.raises(ValueError, match="even batch"):
        Mixup()(x[:5], y[:5])
    with pytest.raises(ValueError, match="integer class labels"):
        Mixup()(x, y.float())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Mixup()(x[0], y)
    with pytest.raises(ValueError, match="mode"):
        Mixup(mode="elem")
    with pytest.raises(ValueError, match="alpha"):
        Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="prob"):
        Mixup(prob=1.5)
    with pytest.raises(ValueError, match="box"):
        Mixup().apply(x, y, MixParams(lam=0.5, use_cutmix=True))
    with pytest.raises(ValueError, match="624"):
        Mixup().load_state_dict({"key": torch.zeros(3), "pos": 0, "has_gauss": 0, "gauss": 0.0})


def test_soft_target_cross_entropy_matches_timm():
    x, y = _batch()
    logits = torch.randn(B, NUM_CLASSES, generator=torch.Generator().manual_seed(1)) * 3
    _, targets = Mixup(num_classes=NUM_CLASSES, seed=0)(x, y)
    expected = timm_loss.SoftTargetCrossEntropy()(logits, targets)
    assert torch.equal(soft_target_cross_entropy(logits, targets), expected)
    half = soft_target_cross_entropy(logits.half(), targets)
    assert half.dtype == torch.float32
    assert torch.equal(half, timm_loss.SoftTargetCrossEntropy()(logits.half().float(), targets))
    one_hot = torch.nn.functional.one_hot(y, NUM_CLASSES).float()
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), nn.functional.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="batch, classes"):
        soft_target_cross_entropy(logits, targets[:, :5])


# -------------------------------------------------------------------------------------------------------- EMA


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model lives in `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)
    )
    model[0].requires_grad_(False)  # a frozen part, like the backbone
    return model


def _train_steps(model: nn.Module, emas: list, steps: int = 6) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 6, 6, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas:
            ema.update(model)


@pytest.mark.parametrize("wrapped", [False, True])
def test_ema_matches_timm_v1(wrapped):
    model = _small_model()
    run_model = _Wrapper(model) if wrapped else model
    ref = timm_ema.ModelEma(run_model, decay=0.9)
    ours = ModelEma(run_model, decay=0.9)
    _train_steps(run_model, [ref, ours])
    ref_sd = {k.removeprefix("module."): v for k, v in ref.ema.state_dict().items()}
    ours_sd, model_sd = ours.state_dict(), model.state_dict()
    assert ours_sd.keys() == ref_sd.keys() == model_sd.keys()
    for key, value in ours_sd.items():
        if value.is_floating_point():
            assert torch.equal(value, ref_sd[key]), key
            if key.startswith("4."):  # trained entries really are averaged, not copied
                assert not torch.equal(value, model_sd[key]), key
        else:  # num_batches_tracked: copied (timm truncates a float blend back into the int)
            assert torch.equal(value, model_sd[key]) and value.item() == 6, key
    assert not ours.module.training and not any(p.requires_grad for p in ours.module.parameters())
    assert not isinstance(ours.module, _Wrapper)


def test_ema_state_dict_round_trip_and_errors():
    model = _small_model()
    ema = ModelEma(_Wrapper(model), decay=0.5)
    _train_steps(model, [ema], steps=2)
    buf = io.BytesIO()
    torch.save({"module." + k: v for k, v in ema.state_dict().items()}, buf)  # a DDP-prefixed checkpoint
    buf.seek(0)
    fresh = ModelEma(_small_model(), decay=0.5)
    fresh.module.train()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not fresh.module.training
    for key, value in ema.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.5)
    with pytest.raises(ValueError, match="state dicts differ"):
        ema.update(nn.Linear(2, 2))


class _Centre:
    """Stub RNG: the CutMix box centre is pixel (5, 5)."""

    def randint(self, low, high):
        return 5


def test_cutmix_box_is_timm_0_9_12s():
    """timm 0.9.12 (the original's pin) cuts `cut // 2` on both sides of the centre: an odd side of 3 gives a box of
    2 pixels (later timm: 3)."""
    lam = 1 - 0.35**2  # cut = int(9 * 0.35) = 3
    assert rand_bbox(_Centre(), 9, 9, lam) == (4, 6, 4, 6)
    assert rand_bbox(_Centre(), 10, 10, 1 - 0.4**2) == (3, 7, 3, 7)  # even side 4: the same in every version


def test_logged_lr_is_the_originals():
    """The original's log: lr after step_update(epoch * steps + idx), printed at idx % 10 == 0 of each epoch, for
    the paper's run (global batch 1024: lr 0.2, 1251 steps per epoch, 10 epochs, 1 warmup epoch)."""
    steps = 1251
    optimizer = _optimizer()
    schedule = functools.partial(cosine_lr, base_lr=0.2, total_steps=10 * steps, warmup_steps=steps)
    scheduler = StepScheduler(optimizer, schedule, lag_one_step=True)
    logged = {}
    for step in range(4 * steps):
        scheduler.step_update(step)
        if is_log_step(step, steps):
            logged[step] = optimizer.param_groups[-1]["lr"]
    assert [round(logged[s], 6) for s in (10, 20, 30)] == [0.001599, 0.003197, 0.004796]
    assert [round(logged[e * steps], 6) for e in (1, 2, 3)] == [0.195106, 0.180902, 0.158779]
    assert 1260 not in logged and 1251 in logged and 1261 in logged  # per-epoch index, not global step % 10
