"""The GPU check: every CUDA path and the 6B measurements in one command, one JSON + Markdown report.

Sections, each its own process under its own time limit (a slow one cannot eat the others; a section cut off keeps
the rows its benchmark had written, since every benchmark rewrites its JSON after each row), the report rewritten
after each section:
  cuda_tests   `pytest -m cuda`: compiled path vs eager and fp32, FP8 fidelity, bf16 storage = autocast, SyncBatchNorm
               in one process, the loaders' CUDA branches (tests/test_cuda.py)
  throughput   the 6B forward at 224 and 504 px: matmul ceiling, eager, transformers' InternVLVisionModel, our
               compiled default, FP8 (img/s, % of ceiling, peak memory, set-up/compile time, fidelity)
  finetune     one FSDP2 fine-tuning step of the 6B segmentor at 504 px, world size 1: peak memory beside the plan
  probing      the fast probe: extraction rate against the pure forward rate, paper mode against extract + sweep + kNN
  loaders      the classification and segmentation loader rates with the host's cores
Random weights and generated data; nothing is downloaded.

  PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check          # one H200: under 8 minutes in all
  python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check          # the CPU smoke mode (debug preset; CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from _bench import environment, rounded

from internvit.atomic import atomic_path, write_json
from internvit.engine.results import format_table

HERE = Path(__file__).resolve().parent
SIX_B = "internvit-6b-224px"


@dataclass(frozen=True)
class Section:
    name: str
    script: str  # a benchmark script in benchmarks/, or "pytest"
    gpu: list[str]  # arguments on a GPU
    smoke: list[str]  # arguments of the CPU smoke mode
    limit_s: int  # time limit on a GPU (their sum stays under 8 minutes)


SECTIONS = [
    Section("cuda_tests", "pytest", ["-m", "cuda", "tests/test_cuda.py"], ["-m", "cuda", "tests/test_cuda.py"], 45),
    Section(
        "throughput",
        "throughput.py",
        ["--preset", SIX_B, "--resolutions", "224", "504", "--variants", "eager", "transformers", "compiled", "fp8"]
        + ["--iters", "5", "--warmup", "1", "--train-variants"],
        ["--preset", "debug", "--resolutions", "56", "--batch-sizes", "2", "--variants", "eager", "--iters", "1"]
        + ["--warmup", "0", "--ceiling-size", "64", "--train-variants"],
        200,
    ),
    Section(
        "finetune",
        "finetune.py",
        ["--preset", SIX_B, "--resolution", "504", "--batch", "2", "--variants", "fsdp", "--iters", "3"]
        + ["--warmup", "1"],
        ["--preset", "debug", "--resolution", "56", "--batch", "2", "--variants", "fsdp", "--iters", "1"]
        + ["--warmup", "0"],
        90,
    ),
    Section(
        "probing",
        "probing.py",
        ["--preset", SIX_B, "--img-size", "224", "--epochs", "1", "--batch", "64"],
        ["--preset", "debug", "--img-size", "56", "--epochs", "1", "--batch", "32"],
        60,
    ),
    Section(
        "loaders",
        "input_pipeline.py",
        ["--preset", SIX_B, "--num-images", "2048", "--workers", "1", "4", "8", "16", "--iters", "5"]
        + ["--seg-images", "64", "--seg-workers", "1", "4", "8", "16"],
        ["--preset", "debug", "--img-size", "56", "--num-images", "24", "--batch-size", "8", "--workers", "0"]
        + ["--e2e-workers", "1", "--iters", "1", "--parts", "cls"],
        75,
    ),
]


def command(section: Section, args: argparse.Namespace, out: Path) -> list[str]:
    extra = section.smoke if args.smoke else section.gpu
    device = ["--device", "cpu" if args.smoke else "cuda"]
    if section.script == "pytest":
        return [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *extra, f"--junitxml={out}"]
    return [sys.executable, str(HERE / section.script), *device, *extra, "--out", str(out)]


def run_section(section: Section, args: argparse.Namespace) -> dict[str, object]:
    """Run one section under its limit; its outcome, seconds, the rows its benchmark wrote and the output's tail."""
    suffix = "xml" if section.script == "pytest" else "json"
    out = args.out / f"{section.name}.{suffix}"
    cmd = command(section, args, out)
    limit = args.limit_s or (120 if args.smoke else section.limit_s)
    record: dict[str, object] = {"section": section.name, "command": " ".join(cmd[1:]), "limit_s": limit}
    if section.script == "pytest" and importlib.util.find_spec("pytest") is None:
        return record | {"status": "not run", "reason": "pytest is not installed here (pip install pytest)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out.unlink(missing_ok=True)  # never report an earlier run's rows as this one's
    start = time.perf_counter()
    # its own session: a section cut off is stopped with every process it started (compile workers, loaders)
    proc = subprocess.Popen(
        cmd,
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"cut off at {limit} s"
    finally:  # gpu_check itself stopped (a signal, Ctrl-C): the section must not go on holding the GPU
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    record |= {"status": status, "seconds": round(time.perf_counter() - start, 1), "tail": output[-3000:]}
    if out.is_file():
        record |= tests_result(out) if suffix == "xml" else {"result": json.loads(out.read_text())}
    return record


def tests_result(junit: Path) -> dict[str, object]:
    """Counts and one row per test from pytest's JUnit XML."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = child.tag
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:80]
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0)})
    counts = {key: sum(r["outcome"].startswith(key) for r in rows) for key in ("passed", "failure", "error", "skipped")}
    return {"tests": counts, "result": {"rows": rows}}


def markdown(report: dict[str, object]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check, {env['date']}",
        "",
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['host_cpus']} host CPUs; "
        f"mode: {report['mode']}; {report['seconds']} s in all.",
    ]
    for record in report["sections"]:
        counts = record.get("tests")
        tests = f" ({', '.join(f'{n} {k}' for k, n in counts.items() if n)})" if counts else ""
        lines += ["", f"## {record['section']}: {record['status']}{tests}", "", f"`{record['command']}`"]
        if "reason" in record:
            lines += ["", record["reason"]]
        rows = (record.get("result") or {}).get("rows") or []
        flat = [rounded({k: v for k, v in row.items() if not isinstance(v, dict | list)}) for row in rows]
        if flat:
            lines += ["", format_table(flat)]
        if record["status"] != "ok" and record.get("tail"):
            lines += ["", "```", str(record["tail"])[-1500:], "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, object], out: Path) -> None:
    write_json(out / "gpu_check.json", report)
    with atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report))


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the CPU smoke mode: debug preset, seconds per section")
    p.add_argument("--sections", nargs="+", default=[s.name for s in SECTIONS], choices=[s.name for s in SECTIONS])
    p.add_argument("--limit-s", type=int, default=0, help="one time limit for every section (default: per section)")
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder of the report and the section files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch  # after argument parsing: --help stays instant

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA GPU here; run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    report: dict[str, object] = {
        "environment": environment(device),
        "mode": "smoke (CPU, debug preset)" if args.smoke else "GPU",
        "sections": [],
        "seconds": 0.0,
        "complete": False,
    }
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)  # an outer time limit: stop the running section too (see run_section)
    for section in (s for s in SECTIONS if s.name in args.sections):
        print(f"gpu_check: {section.name} ...", flush=True)
        report["sections"].append(run_section(section, args))
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_report(report, args.out)  # what is done so far survives the command being cut off
        print(f"gpu_check: {section.name}: {report['sections'][-1]['status']}", flush=True)
    report["complete"] = True
    write_report(report, args.out)
    print(markdown(report))
    return 0 if all(r["status"] == "ok" for r in report["sections"]) else 1


if __name__ == "__main__":
    sys.exit(main())
