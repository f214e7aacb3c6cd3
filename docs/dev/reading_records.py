"""Development data of docs/results.md (twenty-second session, item 67): stage 0's reading and finding records of
a `valr demo` run, as records for a latent stage 2. Keeps the records whose every step starts with `#N view V`
(the demo's `latent_after`, where its latent segments go), and writes image paths as absolute paths, so the files
can be used from anywhere:

    .venv/bin/python docs/dev/reading_records.py RUN OUT

writes OUT/train.jsonl (RUN's stage-0 reading and finding records; its reading records alone when RUN ran
without the finding phases), OUT/read_val.jsonl and OUT/find_val.jsonl
(held-out scenes), and prints how many records each kept.
"""

import json
import re
import sys
from pathlib import Path

from valr.demo.config import DemoConfig

HEAD = re.compile(DemoConfig().latent_after)  # where the demo's latent segments go


def keep(src: Path, dst: Path) -> tuple[int, int]:
    kept = total = 0
    with dst.open("w") as out:
        for line in src.open():
            rec = json.loads(line)
            total += 1
            if all(HEAD.match(s["text"]) for s in rec["steps"]):
                rec["images"] = [str((src.parent / p).resolve()) for p in rec["images"]]
                out.write(json.dumps(rec) + "\n")
                kept += 1
    return kept, total


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    train = run / "stage0_find" / "read_find.jsonl"
    if not train.is_file():  # a run without the finding phases (find_steps=0): its reading records alone
        train = run / "world" / "read.jsonl"
    for src, name in ((train, "train.jsonl"),
                      (run / "world" / "read_val.jsonl", "read_val.jsonl"),
                      (run / "chains" / "find_val.jsonl", "find_val.jsonl")):
        kept, total = keep(src, out / name)
        print(f"{out / name}: {kept} of {total} records")


if __name__ == "__main__":
    main()
