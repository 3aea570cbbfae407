"""CPU smoke runs of the benchmark scripts, with the debug preset: every stage runs and writes sane JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvit.data import build_eval_transform, normalize_images

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--device", "cpu", *args, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant" in proc.stdout or "| stage" in proc.stdout  # the table is printed
    return json.loads(out.read_text())


def test_throughput_smoke(tmp_path):
    args = ["--preset", "debug", "--resolutions", "56", "--batch-sizes", "4", "--iters", "2", "--warmup", "1"]
    args += ["--ceiling-size", "128", "--train-resolution", "56", "--train-batch", "2"]
    args += ["--variants", "fp8", "eager", "transformers", "compiled"]  # eager runs first
    result = run_script("throughput.py", *args, tmp_path=tmp_path)
    assert result["environment"]["torch"] == torch.__version__ and result["ceiling_tflops"] > 0
    assert result["ceiling_dtype"] == "float32"  # a CPU's ceiling; bf16 on GPUs
    assert result["complete"] is True and not [row for row in result["rows"] if "error" in row]
    rows = {row["variant"]: row for row in result["rows"]}
    forward = ["eager", "fp8", "transformers", "compiled"]
    training = ["train-eager (fwd+bwd, AC)", "train-compiled (fwd+bwd, AC)"]
    assert [row["variant"] for row in result["rows"]] == ["ceiling / FLOPs", *forward, *training]
    ceiling = rows["ceiling / FLOPs"]
    for name in forward:
        row = rows[name]
        assert row["img_s"] > 0 and row["timing"]["median_s"] > 0
        # TFLOP/s and % of ceiling follow from img/s and the FLOP formula (ceiling img/s = ceiling rate / FLOPs)
        assert row["tflops"] / ceiling["tflops"] == pytest.approx(row["img_s"] / ceiling["img_s"], rel=1e-6)
        assert row["pct_ceiling"] == pytest.approx(100 * row["tflops"] / result["ceiling_tflops"], rel=1e-6)
        assert row["speedup"] == pytest.approx(row["img_s"] / rows["eager"]["img_s"])
        assert row["setup_s"] >= row["timing"]["first_s"] > 0
    # fidelity: our fast path and transformers agree with the fp32 model; fp8 is close to bf16
    assert rows["compiled"]["rel_err"] < 1e-2 and rows["transformers"]["rel_err"] < 1e-2
    assert rows["compiled"]["cos_min"] > 0.9999
    assert 0.99 < rows["fp8"]["cos_min"] < 1.0 and rows["fp8"]["rel_err"] > rows["compiled"]["rel_err"]
    assert (rows["fp8"]["top1"] * 4) % 1 == 0  # a share of the 4 images
    for name in training:
        assert rows[name]["img_s"] > 0 and rows[name]["batch"] == 2 and rows[name]["res"] == 56


def test_input_pipeline_smoke(tmp_path):
    args = ["--preset", "debug", "--img-size", "56", "--num-images", "40", "--batch-size", "8", "--workers", "0", "2"]
    seg_args = ["--seg-images", "3", "--seg-workers", "0", "1", "--seg-check-images", "2"]  # both parts by default
    result = run_script("input_pipeline.py", *args, "--e2e-workers", "2", *seg_args, tmp_path=tmp_path)
    assert result["complete"] is True
    rows = [r for r in result["rows"] if r["part"] == "cls"]
    loader = [r for r in rows if r["stage"] == "decode+transform"]
    assert {(r["transform"], r["workers"]) for r in loader} == {("float", 0), ("float", 2), ("uint8", 0), ("uint8", 2)}
    assert all(r["img_s"] > 0 and r["images"] == 32 for r in loader)  # 5 full batches, the first timed apart
    (forward,) = [r for r in rows if r["stage"].startswith("forward")]
    e2e = [r for r in rows if r["stage"] == "files -> features"]
    assert len(e2e) == 2 and all(r["images"] == 40 for r in e2e)
    for r in e2e:
        assert r["pct_of_forward"] == pytest.approx(100 * r["img_s"] / forward["img_s"])
    check_segmentation_rows(result)


def check_segmentation_rows(result: dict) -> None:
    """Old (numpy, PIL) and new (OpenCV) segmentation paths: every row, sane rates, ratios that follow from them."""
    same = ["decode", "train_pipeline", "test_pipeline", "train_from_files", "test_from_files", "all"]
    assert result["seg_bit_identical"] == {"images": 2, "normalized_on": "cpu"} | dict.fromkeys(same, True)
    assert result["seg_data"]["images"] == 3 and result["seg_data"]["mean_jpeg_kb"] > 30  # 683x512, textured
    rows = {(r["stage"], r["pipeline"], r["path"], r.get("workers")): r for r in result["rows"] if r["part"] == "seg"}
    stages, paths = ("per core: files", "per core: arrays"), ("old", "new", "new+normalize")
    per_core = [(s, k, p, 0) for s in stages for k in ("train", "test") for p in paths]
    loader = [("DataLoader", k, p, w) for k in ("train", "test") for p in ("old", "new") for w in (0, 1)]
    normalize = [("normalize_images (cpu)", k, "new", None) for k in ("train", "test")]
    assert sorted(rows) == sorted(per_core + loader + normalize)
    for key, row in rows.items():
        assert row["img_s"] > 0 and row["images"] == (row["batch"] if key[0].startswith("normalize") else 3)
        if key[3] is not None:
            assert row["img_s_per_worker"] == pytest.approx(row["img_s"] / max(key[3], 1))
        if key[2] != "old" and key[3] is not None:
            old = rows[key[0], key[1], "old", key[3]]
            assert row["new_over_old"] == pytest.approx(row["img_s"] / old["img_s"])
        else:
            assert "new_over_old" not in row
    for stage, kind, _, _ in per_core:
        new, norm = rows[stage, kind, "new", 0]["img_s"], rows["normalize_images (cpu)", kind, "new", None]["img_s"]
        assert rows[stage, kind, "new+normalize", 0]["img_s"] == pytest.approx(1 / (1 / new + 1 / norm))
    assert {rows[k]["batch"] for k in loader if k[1] == "train"} == {2} and rows[normalize[1]]["batch"] == 1
    assert all(rows[k]["startup_s"] > 0 for k in loader)  # the warm-up epoch, timed apart


def test_finetune_smoke(tmp_path):
    args = ["--preset", "debug", "--resolution", "56", "--batch", "2", "--iters", "2", "--warmup", "1"]
    result = run_script("finetune.py", *args, tmp_path=tmp_path)
    assert result["complete"] is True and result["world_size"] == 1
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["ddp", "fsdp"] and not [row for row in rows.values() if "error" in row]
    for row in rows.values():
        assert row["step_s"] > 0 and row["img_s"] == pytest.approx(2 / row["step_s"])
        assert row["plan_gib"] > 0 and row["peak_gib"] is None  # device memory is tracked on GPUs only
    assert rows["fsdp"]["plan_gib"] > rows["ddp"]["plan_gib"]  # one process: nothing to share, blocks in flight


def test_uint8_loading_then_device_normalisation_is_bit_identical():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    expected = build_eval_transform(224)(image)
    raw = build_eval_transform(224, normalize=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 224, 224)
    assert torch.equal(normalize_images(raw.unsqueeze(0))[0], expected)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(expected)


def test_a_failing_variant_is_recorded_and_partial_results_are_kept(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _bench import ResultLog
    from throughput import guarded

    def out_of_memory() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB\nmore detail")

    log = ResultLog(tmp_path / "r.json", ceiling_tflops=1.0)
    log.add({"variant": "eager", "img_s": 10.0})
    log.add({"variant": "fp8"} | guarded(out_of_memory))
    partial = json.loads((tmp_path / "r.json").read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 2  # on disk after every row
    assert partial["rows"][1]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 GiB"
    log.finish()
    assert json.loads((tmp_path / "r.json").read_text())["complete"] is True


def test_probing_smoke(tmp_path):
    """Paper mode against extract + sweep + kNN on the generated mini ImageNet: the forward counts (epochs x images
    against once per image) and the timings of every stage are in the JSON."""
    args = ["--preset", "debug", "--img-size", "56", "--epochs", "2", "--batch", "32"]
    result = run_script("probing.py", *args, tmp_path=tmp_path)
    rows = {row["stage"]: row for row in result["rows"]}
    assert list(rows) == [
        "paper mode: cls train",
        "fast: cls extract",
        "fast: cls sweep",
        "fast: cls knn",
        "pure forward (random tensors)",
    ]
    assert rows["paper mode: cls train"]["backbone_forwards"] == 2 * 224  # 7 full batches of 32 per epoch
    assert rows["fast: cls extract"]["backbone_forwards"] == 240 + 60  # every train and val image once
    assert rows["fast: cls sweep"]["heads"] == 52 and rows["fast: cls sweep"]["backbone_forwards"] == 0
    assert all(row["wall_s"] > 0 for row in result["rows"][:4]) and rows["pure forward (random tensors)"]["img_s"] > 0
    summary = result["summary"]
    assert summary["forwards_paper"] == 448 and summary["forwards_fast"] == 300
    assert summary["extract_rate_share_of_forward"] > 0 and summary["paper_over_fast_wall"] > 0


def run_gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    cmd = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_smoke_runs_every_section_into_one_report(tmp_path):
    """The GPU check's CPU smoke mode: every section runs and lands in one JSON + Markdown report; the CUDA tests
    are collected (and skip here, without a GPU)."""
    proc, report = run_gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["complete"] and report["mode"].startswith("smoke")
    sections = {r["section"]: r for r in report["sections"]}
    assert list(sections) == ["cuda_tests", "throughput", "finetune", "probing", "loaders"]
    assert all(r["status"] == "ok" for r in sections.values())
    tests = sections["cuda_tests"]
    assert tests["tests"]["skipped"] == len(tests["result"]["rows"]) >= 6 and tests["tests"]["passed"] == 0
    for name in ("throughput", "finetune", "probing", "loaders"):
        result = sections[name]["result"]
        assert result["rows"] and not [row for row in result["rows"] if "error" in row], name
    (fsdp,) = sections["finetune"]["result"]["rows"]
    assert fsdp["variant"] == "fsdp" and fsdp["plan_gib"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## finetune: ok" in text and "| fsdp" in text and "6 skipped" in text


def test_gpu_check_cuts_off_a_slow_section_and_goes_on(tmp_path):
    proc, report = run_gpu_check(tmp_path, "--sections", "throughput", "cuda_tests", "--limit-s", "1")
    assert proc.returncode == 1 and report["complete"]
    assert [r["section"] for r in report["sections"]] == ["cuda_tests", "throughput"]  # after the first, the next
    assert all(r["status"] == "cut off at 1 s" and r["seconds"] < 30 for r in report["sections"])
    assert "cut off at 1 s" in (tmp_path / "gpu_check.md").read_text()
