"""Merges bench/gpu_check.sh's stage results into one JSON file and a markdown summary.

    python bench/gpu_report.py WORK_DIR OUT_DIR

Reads WORK_DIR/stages.jsonl (one line per stage: status, exit code, seconds), env.json,
tests.xml (pytest's junit report), kernels.json, train_step.json, attention_step.json,
packed_forward.json and smoke/metrics.jsonl, whichever exist; writes OUT_DIR/gpu_check.json and
OUT_DIR/gpu_check.md.
Standard library only: it must run whatever else failed.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ElementTree


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tests(path):
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or "").splitlines()[:1]
                failed.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(message)}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def _smoke(work):
    path = os.path.join(work, "smoke", "metrics.jsonl")
    try:
        records = [json.loads(line) for line in open(path)]
    except (OSError, ValueError):
        return None
    last = {}
    for record in records:
        last.update(record)
    return {"records": len(records), "last": last}


def _markdown(report) -> str:
    lines = ["# bench/gpu_check.sh", ""]
    env = report.get("env") or {}
    if env:
        lines.append(
            f"{', '.join(env.get('devices', []))}; python {env.get('python')}, jax "
            f"{env.get('jax')}, torch {env.get('torch')}, triton {env.get('triton')}"
        )
        lines.append("")
    lines += ["| stage | status | seconds (limit) |", "|---|---|---|"]
    for stage in report["stages"]:
        lines.append(
            f"| {stage['stage']} | {stage['status']} (exit {stage['exit']}) | "
            f"{stage['seconds']} ({stage['limit']}) |"
        )
    tests = report.get("tests")
    if tests:
        lines += [
            "",
            f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped.",
        ]
        lines += [f"- FAILED {name}" for name in tests["failed"][:30]]
    kernels = report.get("kernels")
    if kernels:
        lines += [
            "",
            f"## Kernels ({kernels.get('device')}, copy bandwidth "
            f"{kernels.get('copy_bandwidth', 0) / 1e9:.0f} GB/s)",
            "",
            "| K=N | M | format | us | GB/s | of copy bw | vs bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in kernels.get("rows", []):
            speedup = f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else "-"
            lines.append(
                f"| {r['K=N']} | {r['M']} | {r['format']} | {r['us']:.1f} | {r['GB/s']:.0f} | "
                f"{r['of_copy_bw']:.2f} | {speedup} |"
            )
    step = report.get("train_step")
    if step:
        lines += [
            "",
            f"## QAT-TSLD step (SmolLM2-135M shapes, random weights, B={step['batch']}, "
            f"T={step['length']}{', tiny' if step.get('tiny') else ''}, remat={step['remat']})",
            "",
            "| framework | tokens/s | step s | peak device MiB | peak RSS MiB | device |",
            "|---|---|---|---|---|---|",
        ]
        for impl, r in step["results"].items():
            peak = r.get("peak_device_mib")
            lines.append(
                f"| {impl} ({r['version']}) | {r['tokens_per_s']:.0f} | {r['seconds']:.3f} | "
                f"{'-' if peak is None else f'{peak:.0f}'} | {r['max_rss_mib']:.0f} | "
                f"{r['device']} |"
            )
        for impl, error in step.get("failures", {}).items():
            last = error.strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {impl} | FAILED: {last[0][:200]} | | | | |")
        if "speed_vs_torch" in step:
            memory = step.get("device_memory_vs_torch")
            lines += [
                "",
                f"tsld-jax / PyTorch: {step['speed_vs_torch']:.2f}x tokens/s"
                + (f", {memory:.2f}x peak device memory" if memory else ""),
            ]
    attention = report.get("attention_step")
    if attention:
        lines += [
            "",
            f"## Fused attention step (SmolLM2-135M shapes, random weights, "
            f"B={attention['batch']}, T={attention['length']}, "
            f"{attention.get('compute_dtype')} forward, remat={attention['remat']})",
            "",
            "| attention | tokens/s | step s | peak device MiB | device |",
            "|---|---|---|---|---|",
        ]
        for name, r in attention["results"].items():
            peak = r.get("peak_device_mib")
            lines.append(
                f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds']:.3f} | "
                f"{'-' if peak is None else f'{peak:.0f}'} | {r['device']} |"
            )
        for name, error in attention.get("failures", {}).items():
            last = error.strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {name} | FAILED: {last[0][:200]} | | | |")
        for name, speedup in (attention.get("attention_speedup") or {}).items():
            lines += ["", f"attention={name} against the first: {speedup:.2f}x steps/s"]
    forward = report.get("packed_forward")
    if forward:
        lines += [
            "",
            f"## Packed forward ({forward['model']}; kernel: {forward['kernel']})",
            "",
            "| shape | tokens | float bf16 tok/s | packed XLA tok/s | packed kernel tok/s | "
            "kernel vs XLA | kernel vs float | logits rel. diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in forward["rows"]:
            rates = r["tokens_per_s"]
            kernel_rate = rates[f"packed_{forward['kernel']}"]
            lines.append(
                f"| {r['shape']} | {'x'.join(map(str, r['tokens']))} | "
                f"{rates['float_bf16']:.0f} | {rates['packed_xla']:.0f} | {kernel_rate:.0f} | "
                f"{r['kernel_vs_xla_speedup']:.2f}x | {r['kernel_vs_float_speedup']:.2f}x | "
                f"{r['kernel_vs_xla_relative_difference']:.1e} |"
            )
    smoke = report.get("train_smoke")
    if smoke:
        last = smoke["last"]
        shown = {k: v for k, v in last.items() if isinstance(v, int | float)}
        lines += ["", f"## train.py smoke: {smoke['records']} metric records; last: {shown}"]
    return "\n".join(lines) + "\n"


def main():
    work, out = sys.argv[1], sys.argv[2]
    stages = []
    try:
        stages = [json.loads(line) for line in open(os.path.join(work, "stages.jsonl"))]
    except (OSError, ValueError):
        pass
    report = {
        "stages": stages,
        "env": _load(os.path.join(work, "env.json")),
        "tests": _tests(os.path.join(work, "tests.xml")),
        "kernels": _load(os.path.join(work, "kernels.json")),
        "train_step": _load(os.path.join(work, "train_step.json")),
        "attention_step": _load(os.path.join(work, "attention_step.json")),
        "packed_forward": _load(os.path.join(work, "packed_forward.json")),
        "train_smoke": _smoke(work),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(_markdown(report))


if __name__ == "__main__":
    main()
