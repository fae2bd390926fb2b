"""Measures what two tests bound, and writes the record their bounds cite (docs/tolerances.json).

    python bench/tolerances.py [--output docs/tolerances.json]

- tests/teacher_test.py: the relative change of the TSLD loss when the teacher runs in bf16,
  for seeds 0-5 (the test runs 0-2); its bound is 3x the largest.
- tests/train_step_test.py: the relative differences of the bf16-compute TSLD step from the
  float32 one on the same batch and start (loss, gradient norm, update); its bounds are 3x
  these.

Both read the tests' own setup functions, so the figures are those of the asserted cases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "experiments")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "tolerances.json"))
    args = parser.parse_args()

    import paper_table
    import teacher_test
    import train_step_test

    teacher = {seed: teacher_test.bf16_teacher_change(seed)[0] for seed in range(6)}
    loss, grad_norm, update = train_step_test.bf16_step_differences()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "command": "python bench/tolerances.py",
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": paper_table.machine(),
        "bf16_teacher_tsld_relative_change": {str(k): v for k, v in teacher.items()},
        "bf16_step_relative_difference": {"loss": loss, "grad_norm": grad_norm, "update": update},
        "bounds": {
            "teacher_test.BF16_TEACHER_BOUND": teacher_test.BF16_TEACHER_BOUND,
            "train_step_test.BF16_LOSS_RTOL": train_step_test.BF16_LOSS_RTOL,
            "train_step_test.BF16_GRAD_NORM_RTOL": train_step_test.BF16_GRAD_NORM_RTOL,
            "train_step_test.BF16_UPDATE_RTOL": train_step_test.BF16_UPDATE_RTOL,
        },
    }
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
