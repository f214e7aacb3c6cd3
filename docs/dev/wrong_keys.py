"""Development analysis of docs/results.md (fifteenth session, item 54): where does the wrong key of a lookup
chain come from? For every lookup chain (chase, where, tally) whose first wrong step is a ``key_value`` error
(the colour or shape copied from the step before is wrong; ``valr.demo.lookup_error``), the written key is
compared with this step's gold object, with the objects of earlier steps, and with the objects in the step's
target view (rebuilt from the record's scene seed), beside the chance that a random value of that kind is in
that view.

    .venv/bin/python docs/dev/wrong_keys.py RECORDS PREDICTIONS [PREDICTIONS ...]

RECORDS is the evaluated records file (its directory's manifest.json gives the world), PREDICTIONS a
predictions.jsonl written by `valr eval run` on it.
"""

import json
import sys
from collections import Counter
from pathlib import Path

from valr.demo import key_kind, lookup_error, said_steps
from valr.demo.scoring import _LOOKUP_STEP
from valr.synth.world import COLOURS, SHAPES, WorldConfig, generate_scene


def found(step: str) -> set[str]:
    """The words of the object a lookup step lands on (``size colour shape``)."""
    return set(step.split(": ", 1)[1].split())


def wrong_keys(records: Path, predictions: Path) -> dict:
    world = WorldConfig(**json.loads((records.parent / "manifest.json").read_text())["config"]["world"])
    recs = {r["id"]: r for r in map(json.loads, records.read_text().splitlines()) if r}
    source, chance = Counter(), []
    for o in map(json.loads, predictions.read_text().splitlines()):
        r = recs[o["id"]]
        gold = [s["text"].strip() for s in r["steps"]]
        if not all(_LOOKUP_STEP.match(g) for g in gold):
            continue
        said = said_steps(o.get("raw"))
        i = next((i for i, g in enumerate(gold) if i >= len(said) or said[i] != g), None)
        if i is None or lookup_error(gold[i], said[i] if i < len(said) else None) != "key_value":
            continue
        key = _LOOKUP_STEP.match(said[i]).group("key").split()
        source["this step's object" if set(key) <= found(gold[i]) else
               "an earlier step's object" if any(set(key) <= found(g) for g in gold[:i - 1]) else "neither"] += 1
        if len(key) == 1:
            names, attr = (COLOURS, "colour") if key_kind(key) == "colour" else (SHAPES, "shape")
            view = getattr(generate_scene(r["meta"]["scene_seed"], world), attr)[r["meta"]["step_views"][i]]
            present = {int(x) for x in view.flatten() if x >= 0}
            source["in the target view"] += names.index(key[0]) in present
            source["one-word keys"] += 1
            chance.append(len(present) / len(names))
    return {"errors": dict(source), "chance_in_view": sum(chance) / max(len(chance), 1)}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for p in sys.argv[2:]:
        print(p, json.dumps(wrong_keys(Path(sys.argv[1]), Path(p))))


if __name__ == "__main__":
    main()
