"""Every figure in the published tables has a record, and equals it.

The tables read: every table of docs/results/*.md, docs/benchmarks.md and docs/scaling.md, the
tables of README.md's Results and Benchmarks sections, README's deviceless memory-plan table,
and the time figures of README's Quickstart. Each is checked one of three ways:

- **Generated**: the file or table is what its script prints from its JSON, so the test prints
  it again and compares text (docs/results/ptb_*.md from `experiments/paper_table.py` and
  `experiments/llama_cpp_check.py`; docs/scaling.md's plan table from `bench/plan_table.py`
  over docs/plans/*.json).
- **From a JSON record**: each number in a table cell (the first column, the row's label,
  aside) must be, at its printed precision, a value of the JSON record(s) `RECORDS` names for
  the table, or one derived from them as the table derives it (`derived`: means and half
  ranges over seeds, ratios to the teacher, the share of the log gap closed, minutes).
- **Transcribed**: figures measured before their script wrote records (the benchmarks, CI and
  demo times, the memory plan), recorded in docs/records/*.json with the commit that first
  published each row, its date, machine and command, and `"transcribed": true`. Such a table
  must equal its record row by row, number by number. (docs/results/default_run.json is
  transcribed too, the figures `train.py` printed, and is checked as a JSON record.)

A table found in those files that none of the three covers fails: a new figure needs a record.
The checker's own tests (the `fixture` tests at the end) show that a changed figure fails.
No jax program is compiled here; only the record-printing functions of the scripts run.
"""

import contextlib
import glob
import io
import json
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "docs", "results")
RECORDS_DIR = os.path.join(ROOT, "docs", "records")

# A number as the docs print one: 12,215,052 / 145.56 / 1.62e-02, with an optional x or %, and
# not part of a word (sm_90, h100-80gb, 7730d1a, gpt2_0.1b) or of a date.
NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(e[-+]?\d+)?(x|%)?(?!\w|\.\d|,\d{3})"
)
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def numbers(text: str) -> list[tuple[float, float, str]]:
    """The numbers printed in `text`: (value, half a unit of the last printed digit, unit)."""
    found = []
    for m in NUMBER.finditer(DATE.sub(" ", text)):
        whole, frac, exp, unit = m.group(1), m.group(2) or "", m.group(3) or "", m.group(4) or ""
        value = float(whole.replace(",", "") + frac + exp)
        half = 0.5 * 10.0 ** -(len(frac) - 1 if frac else 0) * (10.0 ** int(exp[1:]) if exp else 1)
        found.append((value, half, unit))
    return found


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """Markdown tables in `text`: (header line, rows of cells), the separator line dropped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, i, rows = lines[i].strip(), i + 2, []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def section(text: str, heading: str) -> str:
    """The text under `## heading` up to the next `## ` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def backed(value: float, half: float, unit: str, pool: list[float]) -> bool:
    """Whether a printed number is one of `pool` rounded to its printed digits (a percentage
    may be printed from a fraction)."""
    scales = (1.0, 100.0) if unit == "%" else (1.0,)
    return any(abs(s * v - value) <= half * (1 + 1e-9) + 1e-12 for v in pool for s in scales)


SCOPE = re.compile(r"`([\w.-]+)`")


def scope_of(label: str, before: str, pool: dict[str, list[float]]) -> list[float]:
    """The values a number may come from: those of the loss or model named (in backticks) just
    before it in its cell, or else in its row's label, with the record's shared values (the
    teacher's, round-to-nearest's); every value of the record where neither names one."""
    for text in (before, label):
        names = [n.rsplit("_s", 1)[0] for n in SCOPE.findall(text)]
        names = [n for n in names if n in pool]
        if names:
            return pool[""] + pool[names[-1]]
    return [v for values in pool.values() for v in values]


def unbacked_cells(rows: list[list[str]], pool: dict[str, list[float]]) -> list[str]:
    """The figures of `rows` (label column aside) that no value of their scope in `pool` backs."""
    bad = []
    for row in rows:
        for cell in row[1:]:
            text = DATE.sub(" ", cell)
            for m, (value, half, unit) in zip(NUMBER.finditer(text), numbers(text), strict=True):
                if not backed(value, half, unit, scope_of(row[0], text[: m.start()], pool)):
                    bad.append(f"{row[0]}: {cell!r} ({value:g}{unit})")
    return bad


def transcribed_mismatches(rows: list[list[str]], record_rows: list[dict]) -> list[str]:
    """Rows that differ from a transcribed record: each row's label and every number in it,
    in order, must be the record's."""
    bad = []
    if len(rows) != len(record_rows):
        return [f"{len(rows)} rows, the record has {len(record_rows)}"]
    for row, rec in zip(rows, record_rows, strict=True):
        printed = [n for cell in row[1:] for n in numbers(cell)]
        if row[0] != rec["row"] or len(printed) != len(rec["figures"]):
            bad.append(f"{row[0]!r}: not the record's row {rec['row']!r} {rec['figures']}")
            continue
        for (value, half, unit), want in zip(printed, rec["figures"], strict=True):
            if not backed(value, half, unit, [want]):
                bad.append(f"{row[0]}: {value:g}{unit}, recorded {want}")
    return bad


def leaves(obj) -> list[float]:
    """Every number in a JSON object."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in leaves(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def scoped(record: dict) -> dict[str, list[float]]:
    """A record's values by scope, with the figures the docs derive from them, computed as the
    docs compute them. Scope "" holds what every row may quote (the teacher's and
    round-to-nearest's figures, the record's settings); a loss (`tsld`) holds its seeds' rows
    and their mean, half range over seeds, ratio to the FP teacher and share of the log gap
    closed from round-to-nearest; a model (`gemma3-270m`) holds its run's figures, ratio to
    the teacher, log gap closed and wall time a step."""
    pool = {"": []}
    rows = record.get("rows", {})
    for key, value in record.items():
        if key not in ("rows", "runs", "positions", "reruns"):
            pool[""] += leaves(value)
    for name, row in rows.items():
        scope = name.rsplit("_s", 1)[0] if "_s" in name else ""
        pool.setdefault(scope, []).extend(leaves({k: v for k, v in row.items() if k != "curve"}))
    if "fp" in rows and "ptq" in rows:
        for split in ("validation", "test"):
            teacher, rtn = rows["fp"][split], rows["ptq"][split]

            def ratios(v, scope, teacher=teacher, rtn=rtn):
                pool[scope].extend([v / teacher, math.log(rtn / v) / math.log(rtn / teacher)])

            for name in ("fp", "ptq"):
                ratios(rows[name][split], "")
            by_loss = {}
            for name, r in rows.items():
                if "_s" in name:
                    by_loss.setdefault(name.rsplit("_s", 1)[0], []).append(r[split])
                    ratios(r[split], name.rsplit("_s", 1)[0])
            for loss, v in by_loss.items():
                mean = sum(v) / len(v)
                pool[loss] += [mean, (max(v) - min(v)) / 2]
                ratios(mean, loss)
    for run in record.get("runs", {}).values():
        teacher, rtn, qat = run["teacher_ppl"], run["ptq_ppl"], run["qat_ppl"]
        values = leaves(run) + [qat / teacher, rtn / teacher]
        values.append(math.log(rtn / qat) / math.log(rtn / teacher))
        if "wall_min" in run:
            values.append(run["wall_min"] * 60 / run["step"])
        pool[run["model"]] = values
    return pool


def pool(*names: str) -> dict[str, list[float]]:
    """The scoped values of the records `names`, merged."""
    merged = {"": []}
    for name in names:
        with open(os.path.join(ROOT, name)) as f:
            for scope, values in scoped(json.load(f)).items():
                merged.setdefault(scope, []).extend(values)
    return merged


# Tables checked against JSON records written by the scripts: (file, header's start) -> records.
RECORDS = {
    ("docs/results/README.md", "| loss | val ppl / teacher's | val ppl (2 seeds) |"): (
        "docs/results/ptb_small.json",
    ),
    ("docs/results/README.md", "| loss | val ppl / teacher's (seeds) | val ppl (seeds) |"): (
        "docs/results/ptb_smollm2.json",
    ),
    ("docs/results/README.md", "| model | teacher | round-to-nearest ternary | QAT, steps"): (
        "docs/results/short_runs.json",
    ),
    ("docs/results/README.md", "| model, data | teacher | round-to-nearest ternary |"): (
        "docs/results/default_run.json",
    ),
    ("docs/benchmarks.md", "| data pipeline, 2-core CPU | figure |"): ("docs/data_pipeline.json",),
    ("README.md", "| run | teacher ppl | round-to-nearest ternary / teacher |"): (
        "docs/results/ptb_small.json",
        "docs/results/ptb_smollm2.json",
        "docs/results/short_runs.json",
    ),
}
# Files the scripts generate whole from their JSON; their tables are checked by printing again.
GENERATED = ("ptb_small.md", "ptb_smollm2.md", "ptb_small_llama_cpp.md")
PLAN_TABLE = "| row | target | mesh (data x fsdp x tensor) |"
# The long-context plans (docs/plans/long_context/), printed with their batch column.
PLAN_BATCH_TABLE = "| row | target | batch | mesh (data x fsdp x tensor) |"


def transcribed_records() -> dict[tuple[str, str], dict]:
    """(file, header) -> table record, from docs/records/*.json."""
    out = {}
    for path in sorted(glob.glob(os.path.join(RECORDS_DIR, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        assert record.get("transcribed") is True, f"{path}: a record here says it is transcribed"
        for table in record.get("tables", []):
            for key in ("commit", "date", "machine", "command"):
                for row in table["rows"]:
                    assert row.get(key) or table.get(key), f"{path}: {row['row']!r} has no {key}"
            out[(table["file"], table["header"])] = table
    return out


def published_tables() -> list[tuple[str, str, list[list[str]]]]:
    """(file, header, rows) of every table in the checked files and sections."""
    found = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.md"))):
        if os.path.basename(path) in GENERATED:
            continue
        with open(path) as f:
            found += [(os.path.relpath(path, ROOT), h, r) for h, r in tables(f.read())]
    for name in ("docs/benchmarks.md", "docs/scaling.md"):
        with open(os.path.join(ROOT, name)) as f:
            found += [(name, h, r) for h, r in tables(f.read())]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for heading in ("Results", "Benchmarks"):
        found += [("README.md", h, r) for h, r in tables(section(readme, heading))]
    return found


def json_record_of(path: str, header: str) -> tuple[str, ...] | None:
    for (file, start), names in RECORDS.items():
        if file == path and header.startswith(start):
            return names
    return None


def test_every_published_table_has_a_record():
    transcribed = transcribed_records()
    unrecorded = [
        f"{path}: {header}"
        for path, header, _ in published_tables()
        if not header.startswith((PLAN_TABLE, PLAN_BATCH_TABLE))
        and json_record_of(path, header) is None
        and (path, header) not in transcribed
    ]
    message = "tables with no record (add it to RECORDS or docs/records):\n"
    assert not unrecorded, message + "\n".join(unrecorded)


def test_tables_equal_their_json_records():
    for (path, start), names in RECORDS.items():
        found = [rows for p, h, rows in published_tables() if p == path and h.startswith(start)]
        assert len(found) == 1, f"{path}: {len(found)} tables start {start!r} (RECORDS names one)"
        bad = unbacked_cells(found[0], pool(*names))
        assert not bad, f"{path}, figures that {names} do not give:\n" + "\n".join(bad)


def test_tables_equal_their_transcribed_records():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme_tables = dict(tables(f.read()))
    found = {(p, h): rows for p, h, rows in published_tables()}
    for (path, header), record in transcribed_records().items():
        # README's memory-plan table sits outside the Results and Benchmarks sections.
        rows = found.get((path, header))
        if rows is None and path == "README.md":
            rows = readme_tables.get(header)
        assert rows is not None, f"{path} has no table {header!r} (docs/records names it)"
        bad = transcribed_mismatches(rows, record["rows"])
        assert not bad, f"{path}, {header}:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_results_equal_their_script_output(name):
    from experiments import llama_cpp_check, paper_table

    with open(os.path.join(RESULTS, name.replace(".md", ".json"))) as f:
        record = json.load(f)
    if "rows" in record:
        text = paper_table.markdown(record)
    else:
        text = llama_cpp_check.markdown(name.removesuffix("_llama_cpp.md"), record)
    with open(os.path.join(RESULTS, name)) as f:
        assert f.read() == text, f"docs/results/{name} is not what its script prints from the JSON"


@pytest.mark.parametrize(
    "header, folder, batch",
    [(PLAN_TABLE, "docs/plans", False), (PLAN_BATCH_TABLE, "docs/plans/long_context", True)],
    ids=["plans", "long_context"],
)
def test_plan_table_is_plan_table_output(header, folder, batch):
    import importlib.util

    path = os.path.join(ROOT, "bench", "plan_table.py")
    spec = importlib.util.spec_from_file_location("plan_table", path)
    plan_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_table)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plan_table.main(os.path.join(ROOT, folder), batch)
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        text = f.read()
    assert text.count(header) == 1, header
    start = text.index(header)
    published = text[start : text.index("\n\n", start)].strip()
    assert published == printed.getvalue().strip()


def test_quickstart_times_have_a_record():
    """The CI and demo times in README's Quickstart are those docs/records/quickstart.json holds."""
    with open(os.path.join(ROOT, "README.md")) as f:
        quickstart = section(f.read(), "Quickstart")
    with open(os.path.join(RECORDS_DIR, "quickstart.json")) as f:
        record = json.load(f)
    lines = [
        re.sub(r"Python \d+(\.\d+)*", "Python", line)  # a version, not a figure
        for line in quickstart.splitlines()
        if re.search(r"\d min\b", line)
    ]
    assert len(lines) >= 3, lines  # make demo, make test, the .ci/run comment
    bad = [
        f"{line.strip()!r}: {value:g}"
        for line in lines
        for value, half, unit in numbers(line)
        if not backed(value, half, unit, leaves(record["figures"]))
    ]
    assert not bad, "Quickstart times with no record:\n" + "\n".join(bad)


# --- the checker's own tests, on a tiny fixture ---------------------------------------------------

FIXTURE = """
| loss | val ppl | ratio | gap |
|---|---|---|---|
| teacher | 40.00 | 1 | |
| `tsld` s0 | 1,200 | 30.0x | 80% |
"""


def test_fixture_numbers_parse_as_printed():
    assert numbers("12,215,052 and 1.62e-02, 0.94x; 80% sm_90 h100-80gb:1 7730d1a 2026-12-01") == [
        (12215052.0, 0.5, ""),
        (0.0162, 0.00005, ""),
        (0.94, 0.005, "x"),
        (80.0, 0.5, "%"),
        (1.0, 0.5, ""),
    ]


def test_fixture_checker_accepts_the_record_and_fails_a_changed_figure():
    record_pool = {"": [40.0, 1.0], "tsld": [1200.0, 1200.0 / 40.0, 0.7966], "gt": [7.5]}
    rows = tables(FIXTURE)[0][1]
    assert unbacked_cells(rows, record_pool) == []
    for old, new in (("1,200", "1,300"), ("30.0x", "31.0x"), ("80%", "81%"), ("40.00", "40.01")):
        changed = tables(FIXTURE.replace(old, new))[0][1]
        assert len(unbacked_cells(changed, record_pool)) == 1, (old, new)
    # A figure with no record at all fails too, and one that is another loss's figure.
    assert unbacked_cells(tables(FIXTURE + "| `gt` | 7.6 | | |\n")[0][1], record_pool)
    assert unbacked_cells(tables(FIXTURE.replace("1,200", "7.5"))[0][1], record_pool)
    assert unbacked_cells(tables(FIXTURE + "| `gt` | 7.5 | | |\n")[0][1], record_pool) == []


def test_fixture_transcribed_rows_must_equal_their_record():
    rows = tables(FIXTURE)[0][1]
    record = [
        {"row": "teacher", "figures": [40.0, 1]},
        {"row": "`tsld` s0", "figures": [1200, 30.0, 80]},
    ]
    assert transcribed_mismatches(rows, record) == []
    assert transcribed_mismatches(tables(FIXTURE.replace("30.0x", "30.1x"))[0][1], record)
    assert transcribed_mismatches(tables(FIXTURE.replace("| 1 |", "| 1 | 2 |"))[0][1], record)
    assert transcribed_mismatches(rows[:1], record)
