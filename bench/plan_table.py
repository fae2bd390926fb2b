"""The docs/scaling.md table from `train.py --plan ... --plan-json DIR/ROW_TARGET.json` files.

    for row in opt2.7b_tsld llama7b_tsld ...; do
      python train.py --config configs/$row.py:8xa100 --plan a100-40gb:8 \\
          --plan-json plans/${row}_8xa100.json
    done
    python bench/plan_table.py plans/
    python bench/plan_table.py --batch docs/plans/long_context   # with a batch column

bench/plan_rows.py writes the TPU and long-context records.
"""

import glob
import json
import os
import sys


def main(directory: str, batch: bool = False) -> None:
    print("| row | target | " + ("batch | " if batch else "") + "mesh (data x fsdp x tensor) | "
          "remat | teacher | params | optimizer | teacher | activations + temporaries | "
          "total GiB/device | fits |")  # fmt: skip
    print("|---|---|" + ("---|" if batch else "") + "---|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        out = json.load(open(path))
        row, _, variant = os.path.basename(path)[:-5].rpartition("_")
        target = out["target"] + (" | {} x {}".format(*out["batch"]) if batch else "")
        chosen = [out["plan"]] + [p for p in out["alternatives"] if p["fits"]]
        for p in chosen[:1] + chosen[1:2]:
            mesh = " x ".join(str(v) for v in p["mesh"].values())
            if p["error"]:
                print(f"| {row} | {target} | {mesh} | {p['remat']} | "
                      f"{p['teacher_dtype']} | | | | | | error: {p['error'][:80]} |")  # fmt: skip
                continue
            print(
                f"| {row} | {target} | {mesh} | {p['remat']} | {p['teacher_dtype']} | "
                f"{p['parameters_gib']:.2f} | {p['optimizer_state_gib']:.2f} | "
                f"{p['teacher_gib']:.2f} | {p['activations_and_temporaries_gib']:.2f} | "
                f"{p['total_gib']:.2f} | {'yes' if p['fits'] else 'NO'} |"
            )


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--batch"][0], "--batch" in sys.argv)
