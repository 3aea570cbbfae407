"""The `internvit` command line, driven in-process and once through the installed entry point."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_6B

from internvit.cli import main
from internvit.model import build_model


@pytest.fixture
def pth_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "debug.pth"
    torch.save({"module": build_model(TINY_6B).state_dict()}, path)
    return path


def test_models_lists_presets_with_counts_and_flops(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "5,902,793,600" in out and "5,536,496,000" in out and "3073.2" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["preset"] for r in rows} >= {"internvit-6b-224px", "internvit-300m-448px", "debug"}
    assert main(["models", "--tags"]) == 0
    assert "OpenGVLab/InternViT-6B-448px-V2_5" in capsys.readouterr().out


def test_convert_then_info(tmp_path, pth_checkpoint, capsys):
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(pth_checkpoint), str(dst), "--dtype", "bf16"]) == 0
    assert "preset debug" in capsys.readouterr().out
    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layout"], info["preset"], info["sha256_ok"], info["dtypes"]) == (
        "internvit",
        "debug",
        True,
        {"bfloat16": 56},
    )
    assert main(["info", str(pth_checkpoint)]) == 0
    assert "layout: internvit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "no/such/file.pth"], "no such file or folder"),
        (["convert", "{pth}", "{pth}.safetensors", "--preset", "internvit-300m-448px"], "does not fit preset"),
        (["convert", "{pth}", "{tmp}/x.bin"], "must end in .safetensors"),
        (["convert", "{pth}", "{tmp}/x.safetensors", "--preset", "nope"], "unknown preset"),
    ],
)
def test_user_errors_are_one_line_plus_fix(tmp_path, pth_checkpoint, capsys, argv, message):
    argv = [a.format(pth=pth_checkpoint, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("internvit: error:") and message in err[0]
    assert err[1].startswith("  fix: ") and len(err) == 2


def test_convert_refuses_to_overwrite_without_force(tmp_path, pth_checkpoint, capsys):
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(pth_checkpoint), str(dst)]) == 0
    assert main(["convert", str(pth_checkpoint), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(pth_checkpoint), str(dst), "--force"]) == 0


def test_demo_runs_and_saves_results(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == [1, 17, 64] and summary["intermediate_maps"] == [[1, 64, 4, 4]] * 2
    assert summary["load_report_ok"] is True
    assert "tokens" in capsys.readouterr().out
    assert (tmp_path / "features.safetensors").is_file()


def test_entry_point_runs_as_a_program():
    result = subprocess.run(
        [sys.executable, "-m", "internvit.cli", "info", "missing.pth"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such file or folder" in result.stderr
