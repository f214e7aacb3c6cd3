"""Development analysis of docs/results.md (twenty-eighth session, item 73): under the image bottleneck, which
latent slots does the text need to read the object at a named cell ("#2 view 4 row 4 col 1: large cyan ball")?
Item 72 found the aligned text spreading its attention over its segment (10% on the named slot). Here the text
of each such step is shown only some slots: teacher-forced, fast mode (slots filled as in training), one pass per
condition in which only the rows of the step's text after its segment (``</latent>`` on) lose columns; the slots
themselves are computed as in training. Conditions (other steps' segments hidden in all but ``all``):

    all            the training mask
    segment        the step's own segment only
    named          the named cell's slot only
    without_named  the own segment without the named slot
    other          one other slot only (drawn per step, fixed seed)
    without_other  the own segment without that other slot
    none           no slot at all
    swapped        ``all`` with the next record's images (the floor: nothing read from the image)

Printed per checkpoint: the share of the named object's words (size, colour, shape) predicted right (argmax)
and their CE, and (twenty-ninth session) the share right per kind of word (``right_by_kind``: sizes, colours,
shapes; chance 1/2, 1/6, 1/5). If the named slot alone reads as well as the segment, the cell lives in its
slot; if the segment without it reads as well, it is spread over the others.

``--shift-question`` moves every cell the question names one column over (the steps still name the true
cells): the slots, which see the question, then know a wrong cell is coming. If the text's reading falls,
the latents pick the named cell from the question before the step's text reads it.

``--open`` lifts the bottleneck (the slots computed and the text read with every token seeing the images):
does a text that learned to read its latents under the bottleneck still take from them when the image is in
view ("none" against "segment")?

    .venv/bin/python docs/dev/slot_masking.py RECORDS CHECKPOINT [CHECKPOINT ...] [--limit 32] [--rows FILE]
                                              [--open] [--shift-question]
"""

import argparse
import dataclasses
import json
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from slot_lookup import ADDRESSED, filled_embeds, word_kinds  # docs/dev, beside this script

from valr.backbones.base import causal_mask
from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.demo.probes import object_token_ids, with_swapped_images
from valr.engine import full_mask
from valr.tokens import LatentTokenIds

CONDITIONS = ("all", "segment", "named", "without_named", "other", "without_other", "none", "swapped")


def filled_inputs(bb, batch, layer: int):
    """Input embeddings with each latent slot holding what fast-mode training feeds it, the positions, the
    training mask as a (B, 1, L, L) boolean and fast mode's last hidden states (to check the pass below against)."""
    embeds, positions, out = filled_embeds(bb, batch, layer)
    mask = full_mask(bb, batch)
    return embeds, positions, causal_mask(mask) if mask.dim() == 2 else mask, out.hidden


def shifted_question(question: str, side: int = 4) -> str:
    """The question with every named cell one column over (wrapping), rows kept."""
    return re.sub(r"row (\d+) col (\d+)", lambda m: f"row {m[1]} col {int(m[2]) % side + 1}", question)


def hidden_columns(condition: str, own: list[int], named: int, other: int, slots: list[int]) -> list[int]:
    """Slot columns a step's text rows lose under ``condition``; ``own`` its segment, ``slots`` every slot."""
    others = [c for c in slots if c not in own]
    keep = {"all": slots, "segment": own, "named": [named], "without_named": [c for c in own if c != named],
            "other": [other], "without_other": [c for c in own if c != other], "none": [], "swapped": slots}
    kept = set(keep[condition])
    return [c for c in (own + others) if c not in kept]


def masked(ckpt: Path, records: list, seed: int = 0, open_images: bool = False) -> dict:
    loaded = load_checkpoint(ckpt)
    bb, tok, cfg = loaded.backbone, loaded.tokenizer, loaded.config
    if not (bb.image_bottleneck or open_images):
        raise SystemExit(f"{ckpt}: trained without the image bottleneck; measure it with --open")
    bb.image_bottleneck = not open_images
    lat = LatentTokenIds.from_tokenizer(tok)
    layout = LayoutConfig(k=cfg.k, latent_after=cfg.latent_after)
    objects = set(object_token_ids(tok).tolist())
    rng = random.Random(seed)
    right = dict.fromkeys(CONDITIONS, 0)
    kind_of = {t: k for k, ids in enumerate(word_kinds(tok)) for t in ids}
    by_kind = {c: [0, 0, 0] for c in CONDITIONS}
    kind_words = [0, 0, 0]
    nll = dict.fromkeys(CONDITIONS, 0.0)
    words, steps, check = 0, 0, 0.0
    swapped_records = with_swapped_images(records)
    with torch.no_grad():
        for rec, swapped in zip(records, swapped_records, strict=True):
            batch = make_batch([rec], tok, bb, layout, lat)
            embeds, positions, mask, fast_hidden = filled_inputs(bb, batch, cfg.align_layer)
            slots = batch.slot_positions(0)
            labels = batch.labels[0]
            plan = []  # (rows, own segment, named slot, other slot, prediction positions)
            for i, step in enumerate(rec.steps):
                m = ADDRESSED.match(step.text)
                if not m:
                    continue
                _, row, col = (int(x) - 1 for x in m.groups())
                start = batch.segment_starts[0][i]
                own = list(range(start, start + batch.k))
                side = round(batch.k ** 0.5)
                named = start + row * side + col
                other = rng.choice([c for c in own if c != named])
                rows = list(range(start + batch.k, max(batch.step_positions[0][i]) + 1))
                preds = [p for p in rows if p + 1 < len(labels) and int(labels[p + 1]) in objects]
                plan.append((rows, own, named, other, preds))
            if not plan:
                continue
            steps += len(plan)
            words += sum(len(p[4]) for p in plan)
            kinds = [kind_of[int(labels[p + 1])] for plan_step in plan for p in plan_step[4]]
            for k in kinds:
                kind_words[k] += 1
            for condition in CONDITIONS:
                if condition == "swapped":
                    sb = make_batch([swapped], tok, bb, layout, lat)
                    e, pos, cond_mask, _ = filled_inputs(bb, sb, cfg.align_layer)
                else:
                    e, pos, cond_mask = embeds, positions, mask.clone()
                    for rows, own, named, other, _ in plan:
                        cols = hidden_columns(condition, own, named, other, slots)
                        if cols:
                            cond_mask[0, 0, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = False
                hidden = bb.decode(e, pos, cond_mask, None, None).last_hidden[0]
                if condition == "all":
                    check = max(check, float((hidden - fast_hidden[0]).abs().max()))
                preds = torch.tensor([p for plan_step in plan for p in plan_step[4]])
                logits = bb.logits(hidden[preds]).float()
                target = labels[preds + 1]
                hits = (logits.argmax(-1) == target).tolist()
                right[condition] += sum(hits)
                for k, hit in zip(kinds, hits, strict=True):
                    by_kind[condition][k] += hit
                nll[condition] += float(F.cross_entropy(logits, target, reduction="sum"))
    return {"steps": steps, "object_words": words, "all_vs_fast_max_abs": check,
            "right": {c: round(right[c] / max(words, 1), 4) for c in CONDITIONS},
            "ce": {c: round(nll[c] / max(words, 1), 4) for c in CONDITIONS},
            "right_by_kind": {c: [round(h / max(n, 1), 4) for h, n in zip(by_kind[c], kind_words, strict=True)]
                              for c in CONDITIONS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path, help="reading records (e.g. docs/dev/reading_records.py's read_val.jsonl)")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="latent models trained under the image bottleneck")
    ap.add_argument("--limit", type=int, default=32, help="records measured (the first LIMIT)")
    ap.add_argument("--seed", type=int, default=0, help="draws each step's other slot")
    ap.add_argument("--rows", type=Path, help="also append each line to this JSON-lines file")
    ap.add_argument("--open", action="store_true", help="lift the bottleneck: the text sees the images too")
    ap.add_argument("--shift-question", action="store_true", help="the question names each cell one column over")
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = load_records(args.records)[:args.limit]
    if args.shift_question:
        records = [dataclasses.replace(r, question=shifted_question(r.question)) for r in records]
    for ckpt in args.checkpoints:
        row = {"checkpoint": str(ckpt), "open": args.open, "shift_question": args.shift_question,
               **masked(ckpt, records, args.seed, args.open)}
        print(json.dumps(row), flush=True)
        if args.rows:
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
