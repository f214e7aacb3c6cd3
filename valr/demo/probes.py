"""What a checkpoint learned, measured teacher-forced on validation records: reading and finding cells, the
accuracy of each role of a step's tokens, whether latent segments carry their step's view, whether the model
uses its images at all, and what the alignment loss would be if the latents carried nothing."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from valr.demo.scoring import key_kind


def perception_probe(loaded: Any, read_file: Path, find_file: Path) -> dict[str, float]:
    """:func:`reading_accuracy` on validation read records and :func:`finding_accuracy` on validation find
    records."""
    return {**reading_accuracy(loaded, read_file), **finding_accuracy(loaded, find_file)}


def teacher_forced_batches(loaded: Any, teacher: Any, records_file: Path, cache: Any = None, n: int = 96,
                           batch: int = 16) -> Iterator[tuple[list, Any, Any, dict]]:
    """The first ``n`` records in batches, teacher-forced without gradients in the checkpoint's own layout (K,
    alignment layer, where segments sit): (records, batch, :func:`valr.engine.forward_latent`'s output, the
    ``teacher``'s features of every record image and step target, from ``cache`` where present). Every image a
    segment may be compared with is read (or encoded) once per batch, not per segment."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent
    from valr.teachers import target_features
    from valr.tokens import LatentTokenIds

    cfg, bb, tok = loaded.config, loaded.backbone, loaded.tokenizer
    lay = LayoutConfig(k=cfg.k, latent_after=cfg.latent_after)
    lat = LatentTokenIds.from_tokenizer(tok)
    recs = load_records(records_file)[:n]
    for i in range(0, len(recs), batch):
        rs = recs[i:i + batch]
        with torch.no_grad():  # left before the yield: the caller's grad mode stays its own
            b = make_batch(rs, tok, bb, lay, lat)
            out = forward_latent(bb, b, cfg.align_layer, "fast")
            feats = target_features(teacher, [p for r in rs for p in r.images]
                                    + [Path(t) for ts in b.segment_targets for t in ts if t is not None], cache)
        yield rs, b, out, feats


def segment_view_accuracy(loaded: Any, records_file: Path, feature_cache: Path | None = None, n: int = 96,
                          batch: int = 16) -> dict[str, float]:
    """Does each latent segment carry its step's view? Teacher-forced on ``n`` records
    (:func:`teacher_forced_batches`): for every segment with a target, the alignment loss of its
    projected states against each of the record's images; the segment *picks its view* when the target image
    is the nearest (chance: one over the number of views). A target that is not an input image (e.g. a focus
    image, ``valr.synth.focus``) competes with the record's other distinct step targets instead. Returns
    ``picks_view`` overall and per family and first/later step (``chase/later``), ``align_own`` /
    ``align_other`` (mean loss against the target and against the other images) and ``align_own_map`` (the
    loss against the target per patch position, rows of the teacher's grid: where the latents render their view;
    docs/results.md item 54). Empty for a checkpoint without a trained projector."""
    import torch

    from valr.teachers import FeatureCache, build_teacher

    cfg, aligner = loaded.config, loaded.aligner
    if aligner is None or not cfg.teachers:
        return {}
    teacher = build_teacher(cfg.teachers[0], loaded.backbone)
    cache = FeatureCache(str(feature_cache), teacher) if feature_cache else None
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    own, other, own_maps = [], [], defaultdict(list)
    for rs, b, out, feats in teacher_forced_batches(loaded, teacher, records_file, cache, n, batch):
        for row, (j, s) in enumerate(out.segment_owner):
            target, views = b.segment_targets[j][s], list(rs[j].images)
            if target is not None and Path(target) not in views:  # e.g. focus images: the record's own
                views = sorted({Path(t) for t in b.segment_targets[j] if t is not None})
            if target is None or len(views) < 2:
                continue
            states = out.latent_states[row:row + 1]  # the training loss of this segment against each view
            by_grid: dict[tuple[int, int], list[Path]] = defaultdict(list)
            for v in views:
                by_grid[tuple(feats[v][1])].append(v)
            losses: dict[Path, torch.Tensor] = {}
            with torch.no_grad():  # one projection per grid, compared with all of that grid's views
                for grid, vs in by_grid.items():
                    stacked = torch.stack([feats[v][0] for v in vs])
                    losses.update(zip(vs, aligner.patch_losses(teacher.name, states, stacked, grid), strict=True))
            per_patch = [losses[v] for v in views]
            d = [float(x.mean()) for x in per_patch]
            t = views.index(Path(target))
            own.append(d[t])
            own_maps[tuple(feats[views[t]][1])].append(per_patch[t])
            other += [x for v, x in enumerate(d) if v != t]
            fam = str((rs[j].meta or {}).get("family", "all"))
            for key in ("all", f"{fam}/{'first' if s == 0 else 'later'}"):
                hits[key][0] += int(min(range(len(d)), key=d.__getitem__) == t)
                hits[key][1] += 1
    res = {("picks_view" if k == "all" else f"picks_view/{k}"): a / c for k, (a, c) in sorted(hits.items())}
    if own:
        res.update(align_own=sum(own) / len(own), align_other=sum(other) / max(len(other), 1))
        grid, maps = max(own_maps.items(), key=lambda kv: len(kv[1]))  # the usual grid's segments
        res["align_own_map"] = torch.stack(maps).mean(0).reshape(grid).tolist()
    return res


def reading_accuracy(loaded: Any, records_file: Path, batch: int = 32) -> dict[str, float]:
    """Held-out reading probe: teacher-forced accuracy of the object words (size, colour, shape) of read records,
    for single-view and all-view records, with the records' own images and with every record's images swapped
    for another scene's (the blind level: what the text alone predicts). ``loaded``: a
    :func:`valr.checkpoint.load_checkpoint` result."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_plain

    bb, tok = loaded.backbone, loaded.tokenizer
    obj_ids = object_token_ids(tok)
    recs = load_records(records_file)
    groups = {"one_view": [r for r in recs if len(r.images) == 1], "all_views": [r for r in recs if len(r.images) > 1]}
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, rs in groups.items():
            for suffix, group in (("", rs), ("_swapped_images", with_swapped_images(rs))):
                ok = tot = 0
                for i in range(0, len(group), batch):
                    b = make_batch(group[i:i + batch], tok, bb, LayoutConfig(k=0))
                    right, count = object_hits(bb, forward_plain(bb, b).hidden, b.labels, obj_ids)
                    ok += right
                    tot += count
                out[name + suffix] = ok / max(tot, 1)
    return out


def object_token_ids(tok: Any) -> Any:
    """The token ids of the world's object words (size, colour, shape): what a reading step takes from the image."""
    import torch

    from valr.synth.world import COLOURS, SHAPES, SIZES

    words = [*SIZES, *COLOURS, *SHAPES]
    return torch.tensor(sorted({i for w in words for i in tok(" " + w, add_special_tokens=False)["input_ids"]}))


def object_hits(bb: Any, hidden: Any, labels: Any, object_ids: Any) -> tuple[int, int]:
    """Teacher-forced: how many object words the model predicts right (argmax of the logits at the position
    before each), and how many object words the labels hold."""
    import torch

    target = labels[:, 1:]
    m = torch.isin(target, object_ids)
    return int((bb.logits(hidden[:, :-1][m]).argmax(-1) == target[m]).sum()), int(m.sum())


STEP_ROLES = ("view", "key", "cell", "object", "count")


def token_role(prev: str, word: str, objects: set[str], seen: bool = True) -> str | None:
    """What a step token carries: the number after ``view`` (which view to look at), an object word before the
    step's ``:`` (``seen=False``: the key, what the step looks for: a lookup by content's colour/shape, a count's
    attribute), the number after ``row``/``col`` (which cell), an object word after it (what was seen), a count
    or running total; None for the rest (markers, fixed words)."""
    if word.isdigit():
        if prev == "view":
            return "view"
        if prev in ("row", "col"):
            return "cell"
        if prev in (":", "total") or prev in objects:  # a count's, or a tally step's ``red 2``
            return "count"
        return None
    if word not in objects:
        return None
    return "object" if seen else "key"


def teacher_forced_steps(loaded: Any, records_file: Path, n: int = 128, batch: int = 32, k: int = 0,
                         layer: int | None = None) -> Iterator[tuple[Any, int, list[str], list[bool]]]:
    """Teacher-forced predictions of chain steps: for the first ``n`` records of ``records_file``, yields
    ``(record, step index, words, right)`` per step, ``words`` the step's tokens decoded and ``right[t]`` whether
    the model predicted token ``t`` from the tokens before it (``right[0]`` is always False: it follows the
    previous step). ``k > 0`` lays the chains out with ``k`` latent steps per step (before it, or after its head
    when the checkpoint was trained with ``latent_after``) and runs the latent forward (alignment layer
    ``layer``), the layout a latent variant was trained and answers in. Token positions come from the layout."""
    import torch

    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent, forward_plain
    from valr.tokens import LatentTokenIds

    bb, tok = loaded.backbone, loaded.tokenizer
    if k > 0 and layer is None:
        raise ValueError("teacher-forced steps with latent steps (k > 0) need the alignment layer")
    # where the segments sit (before each step, or after its head) is the checkpoint's own layout setting
    lay = LayoutConfig(k=k, latent_after=loaded.config.latent_after if k > 0 else None)
    lat = LatentTokenIds.from_tokenizer(tok) if k > 0 else None
    recs = load_records(records_file)[:n]
    with torch.no_grad():
        for i in range(0, len(recs), batch):
            rs = recs[i:i + batch]
            b = make_batch(rs, tok, bb, lay, lat)
            out = forward_plain(bb, b) if k == 0 else forward_latent(bb, b, layer, "exact")  # type: ignore[arg-type]
            pred = bb.logits(out.hidden).argmax(-1)
            for j, r in enumerate(rs):
                for s_i, positions in enumerate(b.step_positions[j]):
                    piece = b.input_ids[j, positions].tolist()
                    right = [False] + [bool(pred[j, p - 1] == b.input_ids[j, p]) for p in positions[1:]]
                    yield r, s_i, [tok.decode([t]).strip() for t in piece], right


def step_token_accuracy(loaded: Any, records_file: Path, n: int = 128, batch: int = 32, per_step: bool = True,
                        k: int = 0, layer: int | None = None) -> dict[str, float]:
    """Teacher-forced accuracy of chain tokens by role (:data:`STEP_ROLES`), in the first step and in later steps,
    per question family, e.g. ``{"chase/first_view": 0.9, "chase/later_cell": 0.4, ...}``. Localises a chain's
    failure: a first step's view and cell come from the question (copying), later ones from an instruction found
    by its marker and, for chase/where, from the object found in that view (naming its cell); object words are
    reading. The answer is not included (the evaluation scores it). ``per_step=False`` pools first and later
    steps: ``{"find/cell": 0.3, ...}``. ``k``, ``layer``: as :func:`teacher_forced_steps`."""
    from valr.synth.world import COLOURS, SHAPES, SIZES

    objects = {*SIZES, *COLOURS, *SHAPES}
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r, s_i, words, right in teacher_forced_steps(loaded, records_file, n, batch, k, layer):
        fam = str((r.meta or {}).get("family", "all"))
        for t in range(1, len(words)):
            role = token_role(words[t - 1], words[t], objects, seen=":" in words[:t])
            if role:
                key = f"{fam}/{('first_' if s_i == 0 else 'later_') if per_step else ''}{role}"
                hits[key][0] += int(right[t])
                hits[key][1] += 1
    return {key: a / c for key, (a, c) in sorted(hits.items()) if c}


def finding_accuracy(loaded: Any, find_file: Path, n: int = 128) -> dict[str, float]:
    """How well a model finds a cell by content, teacher-forced on find records: ``find_cells`` (row and col
    numbers pooled, chance 25%), ``find_whole_cells`` (row and col both right, chance 6%; near find_cells squared
    when the two are guessed independently) and whole cells by what the step looks for, ``find_by_colour``,
    ``find_by_shape``, ``find_by_colour_shape`` (both words: neither alone is unique in that view)."""
    tokens, cells = [0, 0], defaultdict(lambda: [0, 0])
    for _, _, words, right in teacher_forced_steps(loaded, find_file, n):
        numbers = [right[t] for t in range(1, len(words)) if words[t - 1] in ("row", "col")]
        kind = key_kind(words[:words.index("at")])
        tokens[0] += sum(numbers)
        tokens[1] += len(numbers)
        for name in ("whole_cells", f"by_{kind}"):
            cells[name][0] += int(all(numbers))
            cells[name][1] += 1
    return {"find_cells": tokens[0] / max(tokens[1], 1),
            **{f"find_{name}": a / c for name, (a, c) in sorted(cells.items())}}


def cache_alignment_baselines(cache_root: Path, limit: int = 2000, center: bool = False) -> dict[str, dict[str, float]]:
    """Per teacher under a feature-cache directory, over up to ``limit`` cached images, the alignment losses of two
    projectors that know nothing about the image: ``mean_feature``, always the mean teacher feature
    (:func:`valr.align.mean_feature_loss`, raw features: the plateau of raw targets), and ``position_mean``, per
    patch position the mean over images, of centred features when ``center`` (the plateau of latents that
    learned their cell only; :func:`valr.align.position_mean_loss`). Empty if no cache."""

    import torch

    from valr.align import mean_feature_loss, position_mean_loss
    from valr.teachers import cached_feature_maps

    out = {}
    for tdir in sorted(p for p in cache_root.glob("*") if p.is_dir()):
        maps = cached_feature_maps(tdir, limit)
        if maps:
            shape = Counter(m.shape for m in maps).most_common(1)[0][0]  # images with the usual patch grid
            out[tdir.name] = {"mean_feature": mean_feature_loss(torch.cat(maps)),
                              "position_mean": position_mean_loss(torch.stack([m for m in maps if m.shape == shape]),
                                                                  center)}
    return out


def with_swapped_images(recs: list) -> list:
    """Each record with the next record's images (the blind reference: what the text alone predicts)."""
    return [dataclasses.replace(r, images=recs[(i + 1) % len(recs)].images) for i, r in enumerate(recs)]


def image_dependence(ckpt: str | Path, records_file: Path, k: int, latent: bool, layer: int, n: int = 64,
                     batch: int = 16) -> dict[str, float]:
    """Teacher-forced CE on ``n`` validation records with their own images and with every record's images
    swapped for the next record's (same number of views). Equal losses mean the model ignores the images.
    Latent variants run their own layout (latent segments, fast mode); SFT the plain CoT layout."""
    import torch

    from valr.checkpoint import load_checkpoint
    from valr.data import LayoutConfig, load_records, make_batch
    from valr.engine import forward_latent, forward_plain
    from valr.tokens import LatentTokenIds

    loaded = load_checkpoint(ckpt)
    bb, tok = loaded.backbone, loaded.tokenizer
    recs = load_records(records_file)[:n]
    swapped = with_swapped_images(recs)
    lat = LatentTokenIds.from_tokenizer(tok) if latent else None
    layout = LayoutConfig(k=k if latent else 0, latent_after=loaded.config.latent_after if latent else None)
    out = {}
    with torch.no_grad():
        for name, rs in (("ce_own_images", recs), ("ce_swapped_images", swapped)):
            tot, cnt = 0.0, 0
            for i in range(0, len(rs), batch):
                b = make_batch(rs[i:i + batch], tok, bb, layout, lat)
                o = forward_latent(bb, b, layer, "fast") if latent else forward_plain(bb, b)
                tot += float(o.loss_ce) * o.n_label_tokens
                cnt += o.n_label_tokens
            out[name] = tot / max(cnt, 1)
    out["gap"] = out["ce_swapped_images"] - out["ce_own_images"]
    return out
