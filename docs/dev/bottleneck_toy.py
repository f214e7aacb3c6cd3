"""Development check of docs/results.md (items 67-70): can a fresh tiny model learn to pass image information
to its text through its latents alone, and does the alignment help it?

Two tasks, both under the image bottleneck unless ``--no-bottleneck``:

- ``colour`` (item 67): each image is one uniform colour (red, blue, green or yellow) and the record's one step
  says it ("It is red.").
- ``cell`` (item 68): each image is a ``--cells`` x ``--cells`` grid of coloured cells, one merged visual token
  per cell; the question names a cell and the step says its colour ("Row 2 col 1 is red."). The step text
  must find the named cell in its latent segment, the lookup item 66 found missing on the demo's model.
  ``--lambda-align`` > 0 adds the method's alignment of the segment's latents to the model's own (frozen,
  random) vision tower's features of the image (teacher kind ``self``, centred targets, as in the demo).

A tiny random Qwen2.5-VL (`valr.tiny`) trains its language model and projector (the vision tower frozen, as in
the demo, unless ``--train-vision``) on random batches of 8 with AdamW, gradient clipped to 1. Every 50 steps it
prints, on the validation records, the CE with their own images and with each record's images swapped for the
next one's (the text has learned to read the image where the two part), the alignment loss, and for ``cell`` the
colour accuracy: the share of records whose own colour gives the step its lowest CE among the four (chance 25%).
Before training it prints the norms of the CE's and the alignment loss's gradients on the language model
(validation records). ``--read-first N`` (thirty-third session, item 78) first trains N steps of plain CoT (no
latents, no bottleneck: the text reads the cells from the image tokens), as the demo's stage 0 taught its text to
read before any latent; every 50 of them it prints the plain CE with own and swapped images (and for ``cell``
the colour accuracy, read from the image tokens).

    .venv/bin/python docs/dev/bottleneck_toy.py [--task colour|cell] [--cells 2] [--mode fast|exact]
        [--no-bottleneck] [--k 4] [--feed hidden|embedding_rms|pause] [--lambda-align 0] [--align-layer 4]
        [--lr 1e-3] [--steps 300] [--seed 0] [--train-vision] [--latent-positions text|grid]
        [--rope-theta 10000] [--marks] [--lookup-heads EVERY] [--lookup-next] [--read-first 0]
"""

import argparse
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from feed_gradient import grad_norm  # docs/dev, beside this script
from PIL import Image
from slot_lookup import attentions_with_latents  # docs/dev

from valr.backbones import LATENT_FEEDS, LATENT_POSITIONS, backbone_for
from valr.backbones.base import image_bottleneck
from valr.config import ValrConfig
from valr.data import LayoutConfig, make_batch, parse_record
from valr.data.collate import IGNORE
from valr.demo.probes import with_swapped_images
from valr.engine import forward_latent, forward_plain
from valr.teachers import TeacherSpec
from valr.tiny import SHAPES, build_tiny
from valr.tokens import LatentTokenIds
from valr.train import Objective

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (220, 220, 30)}
CELL_PX = 28  # one merged visual token (patch 14, merge 2)
MARK_PX = 14  # one patch of a cell
MARK_STEP = 48  # grey levels of the marks of successive 2 x 2 blocks of cells (0-144: up to a 4 x 4 grid)
MAX_MARKED_SIDE = 4


class ColourTask:
    """One uniform colour per image."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        for name, rgb in COLOURS.items():
            Image.fromarray(np.full((56, 56, 3), rgb, dtype=np.uint8)).save(root / f"{name}.png")

    def record(self, i: int, colour: str | None = None):
        colour = colour or self.rng.choice(list(COLOURS))
        return parse_record({"id": f"{colour}{i}", "images": [f"{colour}.png"], "question": "Which colour?",
                             "steps": [{"text": f"It is {colour}.", "target": 0}], "answer": "A"}, root=self.root)

    def validation(self) -> list:
        return [self.record(0, c) for c in COLOURS] * 2

    def train_record(self, i: int):
        return self.record(i)


class CellTask:
    """A grid of coloured cells per image, a pool of ``images`` grids; each record asks for one cell."""

    def __init__(self, root: Path, rng: random.Random, side: int, images: int = 256, val_images: int = 16,
                 marks: bool = False):
        self.root, self.rng, self.side = root, rng, side
        self.grids = []
        for i in range(images + val_images):
            grid = [[rng.choice(list(COLOURS)) for _ in range(side)] for _ in range(side)]
            pixels = np.zeros((side * CELL_PX, side * CELL_PX, 3), dtype=np.uint8)
            for r in range(side):
                for c in range(side):
                    pixels[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = COLOURS[grid[r][c]]
                    if marks:  # a dark quarter at the cell's own (row, col) corner, mod 2, whose grey level
                        # names the 2 x 2 block the cell is in (black in the first): content that says where
                        y, x = r * CELL_PX + (r % 2) * MARK_PX, c * CELL_PX + (c % 2) * MARK_PX
                        pixels[y:y + MARK_PX, x:x + MARK_PX] = MARK_STEP * ((r // 2) * ((side + 1) // 2) + c // 2)
            Image.fromarray(pixels).save(root / f"grid{i}.png")
            self.grids.append(grid)
        self.train_ids = range(images)
        self.val_ids = range(images, images + val_images)
        self.asked: dict[str, tuple[int, int, int]] = {}  # record id -> (image, row, col)

    def record(self, image: int | None = None, cell: tuple[int, int] | None = None, colour: str | None = None):
        image = self.rng.choice(self.train_ids) if image is None else image
        r, c = cell or (self.rng.randrange(self.side), self.rng.randrange(self.side))
        colour = colour or self.grids[image][r][c]
        self.asked[f"g{image}r{r}c{c}"] = (image, r, c)
        return parse_record({"id": f"g{image}r{r}c{c}", "images": [f"grid{image}.png"],
                             "question": f"Which colour is at row {r + 1} col {c + 1}?",
                             "steps": [{"text": f"Row {r + 1} col {c + 1} is {colour}.", "target": 0}],
                             "answer": "A"}, root=self.root)

    def train_record(self, i: int):
        return self.record()

    def validation(self) -> list:
        # two cells of every validation image, the same every run
        pick = random.Random(1)
        return [self.record(i, (pick.randrange(self.side), pick.randrange(self.side)))
                for i in self.val_ids for _ in range(2)]

    def with_colour(self, rec, colour: str):
        image, r, c = self.asked[rec.id]
        return self.record(image, (r, c), colour)

    def colour_index(self, rec) -> int:
        image, r, c = self.asked[rec.id]
        return list(COLOURS).index(self.grids[image][r][c])


def per_record_ce(backbone, batch) -> torch.Tensor:
    """Summed next-token CE of each record's labelled tokens (a plain pass for a batch without latents, else fast
    mode; call under no_grad)."""
    out = forward_plain(backbone, batch) if batch.k == 0 else forward_latent(backbone, batch, 1, "fast")
    logits = backbone.logits(out.hidden[:, :-1])
    target = batch.labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    return (ce * (target != IGNORE)).sum(1)


def colour_accuracy(backbone, batch_of, task: "CellTask", records: list) -> float:
    """The share of ``records`` whose own colour gives the step its lowest CE among the four (chance 25%)."""
    ces = torch.stack([per_record_ce(backbone, batch_of([task.with_colour(r, c) for r in records])) for c in COLOURS])
    truth = torch.tensor([task.colour_index(r) for r in records])
    return float((ces.argmin(0) == truth).float().mean())


RELATIONS = ("named", "row", "col", "other")  # a slot's cell against the named one: itself, same row, same col
WITH_NEXT = ("named", "next", "row", "col", "other")  # "next": the slot after the named one (none after the last)


def lookup_by_head(bb, batch, records, task: "CellTask", tok, layer: int,
                   relations: tuple[str, ...] = RELATIONS) -> torch.Tensor:
    """(layers, heads, len(relations)): of the attention that the step's token before the colour ("is") puts on
    its latent segment (slots row-major, one per cell), the mean share on the named cell's slot, on the other
    slots of its row, of its column, and on the rest (chance for the named slot 1 / K). With WITH_NEXT the slot
    right after the named one has its own share: aligning the last layer, a slot's aligned state is what the
    next slot is fed, so a text may read a cell there rather than at its own slot."""
    att = attentions_with_latents(bb, batch, layer, latent=True)
    side, shares = task.side, []
    for b, rec in enumerate(records):
        q = next(p for p in batch.step_positions[b][0] if tok.decode([int(batch.input_ids[b, p])]).strip() == "is")
        _, r, c = task.asked[rec.id]
        start = batch.segment_starts[b][0]
        on_slots = att[:, b, :, q, start:start + batch.k]  # (layers, heads, K)
        on_slots = on_slots / on_slots.sum(-1, keepdim=True)
        named = r * side + c
        kinds = ["named" if i == named else "next" if "next" in relations and i == named + 1 else
                 "row" if i // side == r else "col" if i % side == c else "other" for i in range(batch.k)]
        shares.append(torch.stack([on_slots[..., [k == j for k in kinds]].sum(-1) for j in relations], -1))
    return torch.stack(shares).mean(0)


def slot_geometry(out) -> str:
    """Cosines of each slot's aligned-layer state with the vector fed in at it and with the slot before's state.
    With the paper's feed, fed vectors far larger than what a fresh model's layers add, a segment's states are
    nearly one vector, which one projector cannot map to K different cells. (Aligning the last layer, the state
    is after the final norm, so it is exactly what the next slot is fed.) ``out``: the engine's output."""
    states, inputs = out.latent_states, out.latent_inputs  # (segments, K, D)
    cos = torch.nn.functional.cosine_similarity
    return (f", slot state vs its input cos {float(cos(states, inputs, dim=-1).mean()):.3f}, vs the slot before "
            f"{float(cos(states[:, 1:], states[:, :-1], dim=-1).mean()):.3f}")


def read_first(objective: Objective, tok, lat: LatentTokenIds, task, val: list, steps: int, lr: float) -> None:
    """Plain CoT on the task's records with the images in view: the text learns to read the cells from the image
    tokens before any latent (the demo's stage 0). The bottleneck and the latent layout come back afterwards."""
    bb = objective.backbone
    bottleneck, bb.image_bottleneck = image_bottleneck(bb), False

    def plain(records):
        return make_batch(records, tok, bb, LayoutConfig(k=0), lat)

    def report(step: int) -> None:
        with torch.no_grad():
            own, swapped = (float(objective.stage1(plain(v)).ce) for v in (val, with_swapped_images(val)))
            line = f"read step {step}: plain CE own images {own:.4f}, swapped {swapped:.4f}"
            if isinstance(task, CellTask):
                line += f", colour accuracy {colour_accuracy(bb, plain, task, val):.3f}"
        print(line, flush=True)

    train([p for p in bb.model.parameters() if p.requires_grad], lr, steps,
          lambda step: objective.stage1(plain([task.train_record(step) for _ in range(8)])).loss, report)
    bb.image_bottleneck = bottleneck


def train(params: list, lr: float, steps: int, loss_at, report) -> None:
    """AdamW on batches of 8 (``loss_at(step)``), gradient clipped to 1; ``report(step)`` every 50 steps and at
    the end."""
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps + 1):
        if step % 50 == 0:
            report(step)
        if step == steps:
            break
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("colour", "cell"), default="colour")
    ap.add_argument("--cells", type=int, default=2, help="cells per side of the cell task's grid (its image side "
                    f"is cells * {CELL_PX} px, one merged visual token per cell)")
    ap.add_argument("--mode", choices=("fast", "exact"), default="fast")
    ap.add_argument("--no-bottleneck", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--feed", choices=LATENT_FEEDS, default="hidden")
    ap.add_argument("--lambda-align", type=float, default=0.0)
    ap.add_argument("--align-layer", type=int, default=4, help="aligned decoder layer (1-based; the tiny model has 4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="seeds the model, the images and the batches")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower too (the `self` "
                    "teacher then encodes with the tower as it is at each step)")
    ap.add_argument("--latent-positions", choices=LATENT_POSITIONS, default="text",
                    help="grid: a segment's slots on the rotary axes like an image's merged patches (item 66)")
    ap.add_argument("--rope-theta", type=float, default=10000.0, help="the tiny model's rotary base (a smaller "
                    "one lets attention tell an image's cells, or grid-placed slots, apart by position)")
    ap.add_argument("--marks", action="store_true", help="cell task: darken one patch of each cell, at the "
                    "cell's own row and column mod 2, to a grey level that names its 2 x 2 block (black on a 2 x 2 "
                    "grid), so that an image token's content says where it is (as the demo world's tints do), not "
                    "only its position")
    ap.add_argument("--lookup-heads", type=int, default=0, metavar="EVERY", help="cell task: every EVERY steps "
                    "print, per layer and head, the share of the step's slot attention on the named cell's slot, "
                    "on the other slots of its row and column, and on the rest")
    ap.add_argument("--lookup-next", action="store_true", help="with --lookup-heads: give the slot right after "
                    "the named one its own share (named/next/row/col/other)")
    ap.add_argument("--read-first", type=int, default=0, metavar="STEPS", help="first train this many steps of "
                    "plain CoT with the images in view (no latents, no bottleneck), with its own optimizer; the "
                    "latent phase's steps then count from 0")
    args = ap.parse_args()
    if args.marks and args.cells > MAX_MARKED_SIDE:
        ap.error(f"--marks names at most {MAX_MARKED_SIDE} x {MAX_MARKED_SIDE} cells (one grey level per 2 x 2 "
                 f"block); use --cells {MAX_MARKED_SIDE} or fewer")
    if args.lookup_heads and (args.task != "cell" or args.k != args.cells ** 2):
        ap.error("--lookup-heads needs --task cell and --k equal to --cells squared (one slot per cell)")
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp())
    task = ColourTask(root, rng) if args.task == "colour" else CellTask(root, rng, args.cells, marks=args.marks)
    model, tok, ip = build_tiny(shape=replace(SHAPES["tiny"], rope_theta=args.rope_theta), seed=args.seed)
    bb = backbone_for(model, image_processor=ip)  # Objective sets the feed from the config
    config = ValrConfig(k=args.k, align_layer=args.align_layer, lambda_align=args.lambda_align,
                        projector_width=256, train_mode=args.mode, center_targets=True,
                        latent_feed=args.feed, image_bottleneck=not args.no_bottleneck,
                        latent_positions=args.latent_positions,
                        teachers=[TeacherSpec(name="self", kind="self")] if args.lambda_align > 0 else [])
    objective = Objective(bb, config)
    lat = LatentTokenIds.from_tokenizer(tok)
    layout = LayoutConfig(k=args.k)

    def batch_of(records):
        return make_batch(records, tok, bb, layout, lat)

    val = task.validation()

    def report(step: int) -> None:
        with torch.no_grad():
            val_batch = batch_of(val)
            own = objective.stage2(val_batch, mode="fast")
            swapped = objective.stage2(batch_of(with_swapped_images(val)), mode="fast")
            line = f"step {step}: CE own images {float(own.ce):.4f}, swapped {float(swapped.ce):.4f}"
            if args.lambda_align > 0:
                line += f", align {float(own.align):.4f}"
            if not args.no_bottleneck:
                line += slot_geometry(own.output)
            if isinstance(task, CellTask):
                line += f", colour accuracy {colour_accuracy(bb, batch_of, task, val):.3f}"
            if args.lookup_heads and step % args.lookup_heads == 0:
                relations = WITH_NEXT if args.lookup_next else RELATIONS
                shares = lookup_by_head(bb, val_batch, val, task, tok, args.align_layer, relations)
                line += "".join(f"\n  layer {i + 1} slot-attention share {'/'.join(relations)} by head: "
                                + "  ".join("/".join(f"{float(v):.2f}" for v in head) for head in heads)
                                for i, heads in enumerate(shares))
        print(line, flush=True)

    for n, p in model.named_parameters():
        p.requires_grad_(args.train_vision or "visual" not in n)  # the vision tower stays frozen unless asked
    torch.manual_seed(args.seed)
    if args.read_first:
        read_first(objective, tok, lat, task, val, args.read_first, args.lr)
    params = [p for p in objective.parameters() if p.requires_grad]
    first = objective.stage2(batch_of(val))
    llm = [p for n, p in model.named_parameters() if "visual" not in n]
    print(f"gradient norm on the language model, validation records: CE {grad_norm(first.ce, llm):.4f}"
          + (f", alignment {grad_norm(first.align, llm):.4f}" if args.lambda_align > 0 else ""), flush=True)
    train(params, args.lr, args.steps,
          lambda step: objective.stage2(batch_of([task.train_record(step) for _ in range(8)])).loss, report)


if __name__ == "__main__":
    main()
