"""Bad settings through the real CLI: each ends in one `internvit: error:` line naming the problem and a `fix:` line,
exit status 2, before any model or dataset loads."""

import errno
import importlib.util
import json
import logging
import os

import pytest
import torch
import yaml

from internvit import __version__
from internvit.atomic import UMASK, write_json
from internvit.classification.config import ClassificationConfig
from internvit.cli import main
from internvit.engine import progress as progress_module
from internvit.engine.config import load_config, to_dict
from internvit.errors import InternViTError
from internvit.model import build_model, get_config
from internvit.segmentation.config import SegmentationConfig

CLS_CASES = [
    ("eval.batch_size=-1", "eval.batch_size must be >= 1, got -1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
    ("train.base_lr=-0.1", "train.base_lr must be > 0, got -0.1"),
    ("train.ema_decay=5", "train.ema_decay must be >= 0 and < 1, got 5"),
    ("train.label_smoothing=1", "train.label_smoothing must be >= 0 and < 1, got 1"),
    ("train.mixup_prob=1.5", "train.mixup_prob must be >= 0 and <= 1, got 1.5"),
    ("train.clip_grad=-1", "train.clip_grad must be >= 0, got -1"),
    ("backbone.img_size=50", "backbone.img_size must be a positive multiple of the patch size 14, got 50"),
    ("backbone.precision=fp64", "backbone.precision must be one of"),
    ("device=bogus", "device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    ("device=cuda:x", "device must be auto, cpu, cuda or cuda:N"),
    ("train.epochs=abc", "train.epochs: expected int, got 'abc'"),
    ("train.nosuch=1", "unknown config field train.nosuch"),
    ("train.epochs=[1,", "override 'train.epochs=[1,': the value is not valid YAML"),
    ("train.epochs", "bad override 'train.epochs'"),
]
SEG_CASES = [
    ("eval.stride=0", "eval.stride must be >= 1, got 0"),
    ("eval.stride=600", "eval.stride=600 exceeds the window (data.crop=504)"),
    ("data.crop=-112", "data.crop must be a positive multiple of the patch size 14, got -112"),
    ("train.lr=-1", "train.lr must be > 0, got -1"),
    ("train.warmup_iters=-1", "train.warmup_iters must be >= 0, got -1"),
    ("train.layer_decay=0", "train.layer_decay must be > 0 and <= 1, got 0"),
    ("eval.scales=[]", "eval.scales must be a non-empty list of positive ratios"),
    ("data.ignore_index=70000", "data.ignore_index must be in [0, 65535]"),
    ("head.kind=fcn", "head.kind must be one of"),
    ("data.reduce_zero_label=false", "ADE20K labels are always reduced"),
]


def expect(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("internvit: error: ") and message in err[0], err
    assert err[1].startswith("  fix: ") and len(err[1]) > len("  fix: "), err
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(("override", "message"), CLS_CASES, ids=[c[0] for c in CLS_CASES])
def test_bad_classification_settings(override, message, tmp_path, capsys):
    expect(["cls", "train", f"output_dir={tmp_path / 'run'}", override], message, capsys)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize(("override", "message"), SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_bad_segmentation_settings(override, message, tmp_path, capsys):
    expect(["seg", "train", f"output_dir={tmp_path / 'run'}", override], message, capsys)


def test_device_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    expect(["cls", "train", "device=cuda", f"output_dir={tmp_path}"], "device=cuda was asked for, but no GPU", capsys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epochs: [1,\n", "is not valid YAML (line 2, column 1)"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "could not determine a constructor"),
        ("- a\n- b\n", "a config must be a YAML mapping"),
        ("train: 3\n", "train: expected a mapping of fields"),
    ],
)
def test_bad_yaml_files(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    expect(["cls", "train", "--config", str(path), f"output_dir={tmp_path / 'run'}"], message, capsys)
    expect(["seg", "train", "--config", str(path), f"output_dir={tmp_path / 'run'}"], message, capsys)


def test_missing_config_and_output_dir_that_is_a_file(tmp_path, capsys):
    expect(["cls", "train", "--config", str(tmp_path / "none.yaml")], "no such config file", capsys)
    (tmp_path / "taken").write_text("a file")
    expect(["cls", "eval", f"output_dir={tmp_path / 'taken'}", "head.checkpoint=x"], "is a file, not a folder", capsys)


def test_atomic_writes_respect_the_umask_and_name_a_full_disk(tmp_path, monkeypatch):
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~UMASK  # not mkstemp's 0600

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(InternViTError, match="no space left to write .*b.json") as info:
        write_json(tmp_path / "b.json", {"x": 2})
    assert "free disk space" in info.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no partial or temporary file left


def test_cli_conveniences(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"internvit {__version__}"
    expect(["cls", "train", "train.epoch=3"], "unknown config field train.epoch (did you mean train.epochs?", capsys)
    with pytest.raises(SystemExit):
        main(["seg", "train", "--help"])
    assert "configs/segmentation/" in capsys.readouterr().out
    assert build_model("debug", init=False).config == get_config("debug")  # a preset name builds
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(isinstance(r["params"], int) and isinstance(r["GFLOPs/img"], float) for r in rows)


def test_progress_off_a_terminal_is_plain_log_lines(monkeypatch, caplog):
    """A job log gets periodic lines, not one endlessly redrawn bar."""
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    bar = progress_module.progress(total=3, desc="train", unit="it")
    assert isinstance(bar, progress_module.PlainProgress)  # pytest's stderr is not a terminal
    bar.every_s = 0.0
    with caplog.at_level(logging.INFO, logger="internvit.progress"):
        bar.set_postfix(loss="0.5")
        for _ in range(3):
            bar.update(1)
        bar.close()
        items = list(progress_module.progress(range(2), desc="eval", unit="img"))
    assert items == [0, 1]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: 1/3 it (") and "loss=0.5" in lines[0] and "\r" not in "".join(lines)
    assert any(line.startswith("eval: 2/2 img") for line in lines)


def test_models_lists_the_released_head_tag(capsys):
    assert main(["models", "--tags", "--json"]) == 0
    rows = {r["tag"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["internvit-6b-224px.head"]["source"] == "OpenGVLab/InternVL/intern_vit_6b_224px_head.pth"
    assert "internvit-6b-224px.hf" in rows


@pytest.mark.parametrize(
    ("command", "cls"), [(["cls", "eval"], ClassificationConfig), (["seg", "train"], SegmentationConfig)]
)
def test_print_config_is_the_resolved_config_and_runs_nothing(command, cls, tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*command, "--print-config", "data.num_workers=3", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    cfg = load_config(cls, None, ["data.num_workers=3", f"output_dir={out}"])
    assert yaml.safe_load(printed) == to_dict(cfg) and cfg.data.num_workers == 3
    assert not out.exists()  # nothing ran
    assert main([*command, "--print-config", "data.num_workerz=3"]) == 2  # the same checks as a run
    assert "did you mean data.num_workers" in capsys.readouterr().err


def test_tensorboard_without_its_package_is_a_config_error(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    message = "tensorboard=true needs the tensorboard package (pip install tensorboard), or tensorboard=false"
    expect(["cls", "train", "tensorboard=true", f"output_dir={tmp_path / 'run'}"], message, capsys)
    expect(["seg", "train", "tensorboard=true", f"output_dir={tmp_path / 'run'}"], message, capsys)
