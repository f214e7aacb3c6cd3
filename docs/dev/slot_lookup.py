"""Development analysis of docs/results.md (twenty-first session, item 66): when a step names the object at a
given cell ("#2 view 4 row 4 col 1: large cyan ball"), does the token before the object's first word attend to
that cell? For a latent model the candidates are the 16 slots of the step's own latent segment (the aligned
grid, row-major); for a plain model (SFT) the 16 visual tokens of the step's view. Teacher-forced, one record at
a time (latent slots filled as in fast-mode training), eager attention, heads averaged. Per layer it prints the
share of the candidates' attention that goes to the named cell, how often the named cell gets the most, and the
candidates' share of all attention; chance for the first two is 1/16. ``--per-head``: per layer and head.
``--values`` (twenty-eighth session, item 73) also weighs what each candidate adds to the attention's output
(its weight times its value, through the output projection): the named cell's share of the candidates' summed
contribution norms, and the norm of its value against the mean of the other candidates'; and for the three
object words after the cell (size, colour, shape), what each head's contributions from the named candidate and
from the others add to the right word's logit over the mean logit of its kind (final norm taken as linear at its
actual scale). ``--own`` (twenty-ninth session) asks whether the other candidates' values carry their own
cells' objects, using the world's labels.npz (beside the records' images): per unit of attention, what the named
candidate adds to its own (the right) word's margin and what each other candidate holding an object adds to
that object's word of the same kind, and the attention on the named candidate, on each other candidate holding
an object and on each empty one; each per object word (where the size, the colour, the shape is predicted).

    .venv/bin/python docs/dev/slot_lookup.py RECORDS [CHECKPOINT ...] [--plain CHECKPOINT ...] [--limit N] [--per-head]
                                             [--values] [--own]

RECORDS is a records file of the demo world (e.g. a run's chains/val.jsonl); the CHECKPOINTs are latent models
(stage 2), those after --plain plain ones (stage 1, SFT).
"""

import argparse
import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from valr.backbones.base import additive_mask
from valr.checkpoint import load_checkpoint
from valr.data import LayoutConfig, load_records, make_batch
from valr.diagnostics.common import eager_attention
from valr.engine import decoder_inputs, forward_latent, full_mask
from valr.synth.dataset import load_labels
from valr.synth.world import COLOURS, SHAPES, SIZES
from valr.tokens import LatentTokenIds

ADDRESSED = re.compile(r"^#\d+ view (\d+) row (\d+) col (\d+): ")  # the cell is given, the object is read


def filled_embeds(bb, batch, layer: int):
    """The input embeddings of ``batch`` with each latent slot holding what fast-mode training feeds it, its
    positions, and fast mode's output (whose ``hidden`` a pass over these embeddings must reproduce)."""
    embeds, positions = decoder_inputs(bb, batch)
    out = forward_latent(bb, batch, layer, "fast")
    for seg, (b, s) in enumerate(out.segment_owner):
        start = batch.segment_starts[b][s]
        embeds[b, start:start + batch.k] = out.latent_inputs[seg]
    return embeds, positions, out


@contextmanager
def captured_values(lm):
    """Collects each decoder layer's value projection output, (B, L, kv_heads x head_dim), during the block, and
    last the final norm's input (the residual stream before it)."""
    values: list[torch.Tensor] = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, o: values.append(o.detach()))
             for layer in lm.layers]
    hooks.append(lm.norm.register_forward_hook(lambda _m, i, _o: values.append(i[0].detach())))
    try:
        yield values
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def value_outputs(bb, values: list[torch.Tensor], heads: int, cands: list[int]) -> torch.Tensor:
    """(layers, heads, candidates, D): each candidate's value through each head's share of the output
    projection, what the head adds to a position's residual stream per unit of attention on it."""
    out = []
    for li, layer in enumerate(bb.lm.layers):
        w_o = layer.self_attn.o_proj.weight
        dim = w_o.shape[1] // heads
        group = heads // (values[li].shape[-1] // dim)
        out.append(torch.stack([values[li][0, cands, (h // group) * dim:(h // group + 1) * dim]
                                @ w_o[:, h * dim:(h + 1) * dim].T for h in range(heads)]))
    return torch.stack(out)


def norm_scale(bb, pre_norm_row: torch.Tensor) -> torch.Tensor:
    """The final RMS norm at one position taken as linear: its gain over the position's actual RMS."""
    return bb.lm.norm.weight / pre_norm_row.pow(2).mean().add(bb.lm.norm.variance_epsilon).sqrt()


def word_kinds(tok) -> list[list[int]]:
    """The token ids of the world's sizes, colours and shapes, one list per kind."""
    return [[tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in kind] for kind in (SIZES, COLOURS, SHAPES)]


@torch.no_grad()
def logit_measures(bb, kinds: list[list[int]], outputs: torch.Tensor, pre_norm: torch.Tensor, att: torch.Tensor,
                   ids: torch.Tensor, q: int, cands: list[int], right: int):
    """(layers, heads) three times: summed over the object words predicted at ``q`` (the colon) and the two words
    after it, the named candidate's and the other candidates' contributions to the right word's logit minus
    the mean logit of its kind (sizes, colours or shapes), and the others' summed absolute contributions (large
    against their sum: they cancel; small: each is neutral). ``outputs`` from value_outputs, ``pre_norm`` the
    final norm's input (L, D)."""
    w_u = bb.model.lm_head.weight
    named, others, others_abs = 0.0, 0.0, 0.0
    for p in (q, q + 1, q + 2):
        target = int(ids[p + 1])
        kind = next(k for k in kinds if target in k)
        direction = w_u[target] - w_u[kind].mean(0)
        d = att[:, :, p, cands] * (outputs @ (norm_scale(bb, pre_norm[p]) * direction))  # (layers, heads, candidates)
        named = named + d[..., right]
        others = others + d.sum(-1) - d[..., right]
        others_abs = others_abs + d.abs().sum(-1) - d[..., right].abs()
    return named, others, others_abs


class CellLabels:
    """A view's cell labels from the labels.npz of the world the records' images live in
    (``world/images/SPLIT/NAME.png``): as classes, or as each cell's object word ids per kind."""

    KEYS = ("present", "size", "colour", "shape")

    def __init__(self, tok, world: Path):
        self.z = load_labels(world)
        self.rows = {str(p): i for i, p in enumerate(self.z["paths"])}
        names = tuple(tuple(str(w) for w in self.z[f"{k}_names"]) for k in self.KEYS[1:])
        assert names == (SIZES, COLOURS, SHAPES), f"{world}: labels name other words than valr.synth.world's"
        self.ids = word_kinds(tok)

    def classes(self, image: Path) -> np.ndarray:
        """(4, cells) row-major: presence, then the size, colour and shape class (-1 where empty)."""
        i = self.rows["/".join(image.parts[-3:])]
        return np.stack([self.z[k][i].reshape(-1).astype(np.int64) for k in self.KEYS])

    def cells(self, image: Path) -> list[tuple[int, int, int] | None]:
        """Per cell the object's size, colour and shape word ids, or None where the cell is empty."""
        present, *kinds = self.classes(image)
        return [tuple(ids[c] for ids, c in zip(self.ids, cls, strict=True)) if p else None
                for p, *cls in zip(present, *kinds, strict=True)]


@torch.no_grad()
def own_word_measures(bb, kinds: list[list[int]], outputs: torch.Tensor, pre_norm: torch.Tensor,
                      att_rows: torch.Tensor, ids: torch.Tensor, q: int, cells: list, right: int):
    """Per layer, head and word (layers, heads, 3): the named candidate's margin for its own word per unit of
    attention, the mean of the same for each other candidate holding an object (its object's word of that kind,
    predicted at the same position), and the attention weight on the named candidate, on each other
    candidate holding an object and on each empty one. ``att_rows`` is (layers, heads, 3, candidates) at
    the three positions."""
    w_u = bb.model.lm_head.weight
    unit = []
    for j, p in enumerate((q, q + 1, q + 2)):
        assert cells[right][j] == int(ids[p + 1]), "the labels do not match the step's text"
        kind = kinds[j]
        words = torch.tensor([c[j] if c else kind[0] for c in cells])
        directions = w_u[words] - w_u[kind].mean(0)  # (candidates, D)
        unit.append((outputs * (norm_scale(bb, pre_norm[p]) * directions)).sum(-1))  # (layers, heads, candidates)
    unit = torch.stack(unit, -1)  # (layers, heads, candidates, 3)
    occupied = [i for i, c in enumerate(cells) if c and i != right]
    empty = [i for i, c in enumerate(cells) if not c]
    nans = torch.full_like(att_rows[..., 0], float("nan"))
    return (unit[..., right, :], unit[..., occupied, :].mean(-2) if occupied else nans, att_rows[..., right],
            att_rows[..., occupied].mean(-1) if occupied else nans, att_rows[..., empty].mean(-1) if empty else nans)


@torch.no_grad()
def teacher_forced_pass(bb, batch, layer: int, latent: bool, **outputs):
    """The language model's output of one teacher-forced pass over ``batch`` in which each latent slot holds
    what fast-mode training feeds it, under the training mask (the image bottleneck's where it is on);
    ``outputs`` e.g. ``output_hidden_states=True``."""
    if latent:
        embeds, positions, _ = filled_embeds(bb, batch, layer)
    else:
        embeds, positions = decoder_inputs(bb, batch)
    mask = full_mask(bb, batch)
    if mask.dim() == 4:
        mask = additive_mask(mask, embeds.dtype)
    return bb.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **outputs)


def attentions_with_latents(bb, batch, layer: int, latent: bool) -> torch.Tensor:
    """Eager attention weights, (layers, B, heads, L, L), of a teacher_forced_pass."""
    with eager_attention(bb.model):
        return torch.stack(teacher_forced_pass(bb, batch, layer, latent, output_attentions=True).attentions)


@torch.no_grad()
def value_measures(outputs: torch.Tensor, att: torch.Tensor, q: int, cands: list[int], right: int):
    """Per layer and head (layers, heads): the named candidate's share of the candidates' summed contribution
    norms (attention weight times the norm of its value through the output projection), and its value norm over
    the mean of the others'. ``outputs`` from value_outputs, ``att`` the pass's (layers, heads, L, L)."""
    norms = outputs.norm(dim=-1)  # (layers, heads, candidates)
    contrib = att[:, :, q, cands] * norms
    others = torch.cat([norms[..., :right], norms[..., right + 1:]], -1)
    return contrib[..., right] / contrib.sum(-1), norms[..., right] / others.mean(-1)


def lookups(ckpt: Path, records: Path, limit: int, latent: bool, per_head: bool = False,
            values: bool = False, own: bool = False) -> dict:
    loaded = load_checkpoint(ckpt)
    bb, tok, cfg = loaded.backbone, loaded.tokenizer, loaded.config
    lat = LatentTokenIds.from_tokenizer(tok) if latent else None
    layout = LayoutConfig(k=cfg.k if latent else 0, latent_after=cfg.latent_after if latent else None)
    colon = tok.convert_tokens_to_ids(":")
    share, top, mass, n = None, None, None, 0
    vshare, vratio, lnamed, lothers, labs = 0.0, 0.0, 0.0, 0.0, 0.0
    kinds = word_kinds(tok) if values or own else []
    own_sums, own_counts, labels = None, None, None
    for rec in load_records(records)[:limit]:
        batch = make_batch([rec], tok, bb, layout, lat)
        with captured_values(bb.lm) as captured:
            full = attentions_with_latents(bb, batch, cfg.align_layer, latent)[:, 0]  # (layers, heads, L, L)
        *last_values, pre_norm = captured[-len(bb.lm.layers) - 1:]  # the last pass's values, final-norm input
        att = full if per_head else full.mean(1, keepdim=True)
        images = (batch.input_ids[0] == bb.image_token_id).nonzero().flatten().tolist()
        for i, step in enumerate(rec.steps):
            m = ADDRESSED.match(step.text)
            if not m:
                continue
            view, row, col = (int(x) - 1 for x in m.groups())
            q = next(p for p in batch.step_positions[0][i] if int(batch.input_ids[0, p]) == colon)
            if latent:
                side = round(batch.k ** 0.5)
                start = batch.segment_starts[0][i]
                cands = list(range(start, start + batch.k))
            else:
                per = len(images) // len(rec.images)
                side = round(per ** 0.5)
                cands = images[view * per:(view + 1) * per]
            a = att[:, :, q, cands]  # (layers, heads or 1, 16)
            right = row * side + col
            s = a[..., right] / a.sum(-1)
            t = (a.argmax(-1) == right).float()
            share, top = (s, t) if share is None else (share + s, top + t)
            mass = a.sum(-1) if mass is None else mass + a.sum(-1)
            if values or own:
                outputs = value_outputs(bb, last_values, full.shape[1], cands)
            if values:
                vs, vr = value_measures(outputs, full, q, cands, right)
                ln, lo, la = logit_measures(bb, kinds, outputs, pre_norm[0], full, batch.input_ids[0], q, cands,
                                            right)
                vshare, vratio, lnamed, lothers, labs = vshare + vs, vratio + vr, lnamed + ln, lothers + lo, labs + la
            if own:
                labels = labels or CellLabels(tok, rec.images[view].parents[2])
                cells = labels.cells(rec.images[view])
                assert cells[right] is not None, f"{rec.id}: step {i + 1} names an empty cell"
                got = own_word_measures(bb, kinds, outputs, pre_norm[0], full[:, :, q:q + 3][..., cands],
                                         batch.input_ids[0], q, cells, right)
                ok = [(~torch.isnan(g)).float() for g in got]
                got = [torch.nan_to_num(g) for g in got]
                own_sums = got if own_sums is None else [a + g for a, g in zip(own_sums, got, strict=True)]
                own_counts = ok if own_counts is None else [a + o for a, o in zip(own_counts, ok, strict=True)]
            n += 1
    def r(x: torch.Tensor) -> list:
        rows = [[round(float(v) / max(n, 1), 4) for v in layer] for layer in x]
        return rows if per_head else [layer[0] for layer in rows]

    out = {"lookups": n, "share_on_named_cell": r(share), "named_cell_top": r(top), "candidates_share": r(mass)}
    if values:  # heads averaged unless per_head
        out["value_share_on_named_cell"] = r(vshare if per_head else vshare.mean(1, keepdim=True))
        out["named_value_norm_over_others"] = r(vratio if per_head else vratio.mean(1, keepdim=True))
        # logit gains, per lookup (three words), heads summed unless per_head
        out["logit_from_named"] = r(lnamed if per_head else lnamed.sum(1, keepdim=True))
        out["logit_from_others"] = r(lothers if per_head else lothers.sum(1, keepdim=True))
        out["logit_from_others_abs"] = r(labs if per_head else labs.sum(1, keepdim=True))
    if own:  # heads averaged unless per_head, each a mean over the lookups that have it; attention per word
        names = ("own_unit_named", "own_unit_occupied_others", "attention_named", "attention_occupied_other",
                 "attention_empty_other")
        for name, a, c in zip(names, own_sums, own_counts, strict=True):
            m = a / c.clamp(min=1)
            out[name] = rounded((m if per_head else m.mean(1)).tolist())
    return out


def rounded(x):
    return [rounded(v) for v in x] if isinstance(x, list) else round(x, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="*", help="latent models")
    ap.add_argument("--plain", type=Path, nargs="+", default=[], help="plain models (stage 1, SFT)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--per-head", action="store_true", help="one value per layer and head instead of heads averaged")
    ap.add_argument("--values", action="store_true", help="also weigh each candidate's value (see above)")
    ap.add_argument("--own", action="store_true",
                    help="also each other candidate's margin for its own object (see above)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for ckpt, latent in [(c, True) for c in args.checkpoints] + [(c, False) for c in args.plain]:
        out = lookups(ckpt, args.records, args.limit, latent, args.per_head, args.values, args.own)
        print(ckpt, json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
