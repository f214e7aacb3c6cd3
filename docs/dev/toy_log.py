"""Development tables of docs/results.md (items 77-78): `docs/dev/bottleneck_toy.py` logs gathered into one results
file, with the summary each toy item reports.

    .venv/bin/python docs/dev/toy_log.py OUT.json --run NAME LOG COMMAND [--run ...] [--note TEXT] [--machine TEXT]
    .venv/bin/python docs/dev/toy_log.py --summary JSON [NAME ...]

The first form parses each run's log (its reports every 50 steps, the lookup shares and, with ``--read-first``,
the plain reading phase's reports) into OUT.json, in the form of `docs/results/toy-4x4-layer-item77.json`, and
prints the summary. The second prints the summary of runs already gathered. Summary per run: the first report
with the alignment loss under 0.1 (and the lowest); the first report *parted* (CE with swapped images more than
0.002 above the CE with own images: the text reads its latents) and how many reports parted; the colour
accuracy at the last report and its mean over the last 10 (chance 25%); the CE gap and the cosine of successive
slots' states at the last report; for a run that read first, the plain phase's colour accuracy over its last 10
reports.
"""

import argparse
import json
import re
from pathlib import Path

COLUMNS = ["step", "ce_own", "ce_swapped", "align", "slot_state_vs_input_cos", "slot_state_vs_slot_before_cos",
           "accuracy"]
READ_COLUMNS = ["step", "ce_own", "ce_swapped", "accuracy"]
PARTED = 0.002  # CE with swapped images this much above own: the text reads its latents
LEARNED = 0.1  # alignment loss under this: learned

NUM = r"(-?[\d.]+)"
REPORT = re.compile(rf"^step (\d+): CE own images {NUM}, swapped {NUM}(?:, align {NUM})?"
                    rf"(?:, slot state vs its input cos {NUM}, vs the slot before {NUM})?(?:, colour accuracy {NUM})?$")
READ = re.compile(rf"^read step (\d+): plain CE own images {NUM}, swapped {NUM}(?:, colour accuracy {NUM})?$")
SHARES = re.compile(r"^  layer (\d+) slot-attention share ([a-z/]+) by head: (.*)$")


def number(text: str | None) -> float | int | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else float(text)


def parse(log: Path) -> dict:
    """One run's log as {gradient_line, columns, rows[, read_columns, read_rows][, slot_share_..._by_layer_head]}."""
    run: dict = {"columns": COLUMNS, "rows": []}
    read_rows, shares, step, relations = [], {}, None, None
    for i, line in enumerate(log.read_text().splitlines(), start=1):
        if line.startswith("gradient norm"):
            run["gradient_line"] = line
        elif m := REPORT.match(line):
            run["rows"].append([number(x) for x in m.groups()])
            step = m.group(1)
        elif m := READ.match(line):
            read_rows.append([number(x) for x in m.groups()])
        elif m := SHARES.match(line):
            if step is None:
                raise SystemExit(f"{log}:{i}: lookup shares before any report")
            relations = m.group(2)
            heads = [[float(v) for v in head.split("/")] for head in m.group(3).split()]
            shares.setdefault(step, {})[m.group(1)] = heads
        elif line.strip():
            raise SystemExit(f"{log}:{i}: not a bottleneck_toy.py line: {line[:80]!r} (a log of another script, "
                             "or one cut off mid-line?)")
    if not run["rows"]:
        raise SystemExit(f"{log}: no reports; is the run still starting?")
    if read_rows:
        run.update(read_columns=READ_COLUMNS, read_rows=read_rows)
    if shares:
        run[f"slot_share_{relations.replace('/', '_')}_by_layer_head"] = shares
    return run


def columns(run: dict) -> dict[str, list]:
    """The run's reports as one list per column."""
    return {c: [row[i] for row in run["rows"]] for i, c in enumerate(run["columns"])}


def ce_gaps(col: dict[str, list]) -> list[float]:
    """Per report, the CE with swapped images minus the CE with own images (above zero: the text reads)."""
    return [s - o for s, o in zip(col["ce_swapped"], col["ce_own"], strict=True)]


def summary(run: dict) -> dict:
    col = columns(run)
    gaps = ce_gaps(col)
    parted = [st for st, g in zip(col["step"], gaps, strict=True) if g > PARTED]
    last10 = col["accuracy"][-10:]
    out = {"last_step": col["step"][-1], "first_parted": parted[0] if parted else None, "reports_parted": len(parted),
           "accuracy_last": col["accuracy"][-1], "accuracy_last10": sum(last10) / len(last10),
           "gap_last": gaps[-1], "successive_slots_last": col["slot_state_vs_slot_before_cos"][-1]}
    if col["align"][0] is not None:
        learned = [st for st, a in zip(col["step"], col["align"], strict=True) if a < LEARNED]
        out.update(align_learned=learned[0] if learned else None, align_lowest=min(col["align"]))
    if "read_rows" in run:
        acc = [row[READ_COLUMNS.index("accuracy")] for row in run["read_rows"]]
        out["read_accuracy_last10"] = sum(acc[-10:]) / len(acc[-10:])
    return out


def step(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def print_summary(runs: dict, names: list[str]) -> None:
    print("| run | alignment under 0.1 from (lowest) | first report parted (reports parted) | colours at the last "
          "report (last 10) | CE gap at the end | successive slots | plain reading first (last 10) |")
    print("|---|---|---|---|---|---|---|")
    for name in names or list(runs):
        s = summary(runs[name])
        align = f"{step(s['align_learned'])} ({s['align_lowest']:.4f})" if "align_lowest" in s else ""
        read = f"{100 * s['read_accuracy_last10']:.1f}%" if "read_accuracy_last10" in s else ""
        print(f"| {name} (to step {s['last_step']:,}) | {align} | {step(s['first_parted'])} "
              f"({s['reports_parted']}) | {100 * s['accuracy_last']:.0f}% ({100 * s['accuracy_last10']:.1f}%) | "
              f"{s['gap_last']:.3f} | {s['successive_slots_last']:.2f} | {read} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="the results file to write")
    ap.add_argument("--run", nargs=3, action="append", default=[], metavar=("NAME", "LOG", "COMMAND"))
    ap.add_argument("--note", default="")
    ap.add_argument("--machine", default="")
    ap.add_argument("--summary", nargs="+", metavar=("JSON", "NAME"),
                    help="print the summary of this results file's runs (of the NAMEs given, else all)")
    args = ap.parse_args()
    if args.summary:
        path, *names = args.summary
        runs = json.loads(Path(path).read_text())["runs"]
        if missing := [n for n in names if n not in runs]:
            ap.error(f"{path} has no run {missing}; it holds {sorted(runs)}")
        print_summary(runs, names)
        return
    if args.out is None or not args.run:
        ap.error("give OUT.json and at least one --run NAME LOG COMMAND (or --summary JSON)")
    runs = {name: {"command": command, **parse(Path(log))} for name, log, command in args.run}
    args.out.write_text(json.dumps({"machine": args.machine, "note": args.note, "runs": runs}, indent=1))
    print_summary(runs, [])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
