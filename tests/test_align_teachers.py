"""REPA alignment, teachers and the stage-2 objective."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from valr.align import (
    Aligner,
    Projector,
    cosine_distance,
    grid_side,
    latent_grid_side,
    latents_to_grid,
    mean_feature_loss,
    position_mean_loss,
)
from valr.config import ValrConfig
from valr.data import LayoutConfig, make_batch
from valr.teachers import (
    FeatureCache,
    FeatureCacheMismatch,
    HFVisionTeacher,
    TeacherSpec,
    build_teacher,
    register_teacher,
    target_features,
)
from valr.train import Objective


@pytest.mark.parametrize("k, grid", [(1, (3, 5)), (4, (2, 2)), (9, (14, 14)), (16, (16, 16)), (25, (7, 9))])
def test_grid_shapes(k, grid):
    states = torch.randn(3, k, 8)
    out = latents_to_grid(states, grid)
    assert out.shape == (3, grid[0] * grid[1], 8)
    if k == 4 and grid == (2, 2):
        torch.testing.assert_close(out, states)  # same size: no resampling, row-major
    if k == 1:  # one latent fills the whole grid
        torch.testing.assert_close(out, states.expand(3, grid[0] * grid[1], 8))


@pytest.mark.parametrize("k", [0, 2, 8, 15])
def test_non_square_k_rejected(k):
    with pytest.raises(ValueError, match="perfect square"):
        grid_side(k)


def test_aligned_latents_use_only_the_first_slots():
    """aligned_latents=4 of K=5: the loss is the all-K loss of the first 4 states, and the fifth state (free to
    carry other things) gets no gradient from it."""
    torch.manual_seed(0)
    part = Aligner(8, {"t": 6}, width=16, slots=4)
    whole = Aligner(8, {"t": 6}, width=16)
    whole.load_state_dict(part.state_dict())
    states = torch.randn(3, 5, 8, requires_grad=True)
    targets = {"t": [(i, torch.randn(9, 6), (3, 3)) for i in range(3)]}
    loss, _ = part.loss(states, targets)
    torch.testing.assert_close(loss, whole.loss(states[:, :4], targets)[0])
    (grad,) = torch.autograd.grad(loss, states)
    assert grad[:, 4].abs().max() == 0 and grad[:, :4].abs().min() > 0
    assert [latent_grid_side(5, 4), latent_grid_side(16, 0), latent_grid_side(20, 16)] == [2, 4, 4]
    for k, aligned, msg in [(5, 3, "square grid"), (5, 9, "between 0"), (20, 0, "e.g. 16 of K=20"),
                            (4, -1, "between 0")]:
        with pytest.raises(ValueError, match=msg):
            latent_grid_side(k, aligned)


def test_loss_zero_for_identical_directions_and_two_for_opposite():
    torch.manual_seed(0)
    aligner = Aligner(8, {"t": 8}, width=16)
    states = torch.randn(2, 4, 8)
    with torch.no_grad():
        pred = aligner.projectors["t"](latents_to_grid(states, (4, 4)))
    targets = {"t": [(i, pred[i] * 3.0, (4, 4)) for i in range(2)]}  # same direction, other norm
    loss, per = aligner.loss(states, targets)
    assert abs(loss.item()) < 1e-6 and set(per) == {"t"}
    opposite = {"t": [(i, -pred[i], (4, 4)) for i in range(2)]}
    assert abs(aligner.loss(states, opposite)[0].item() - 2.0) < 1e-5


def test_patch_losses_average_to_the_loss():
    """The per-patch losses a probe maps (e.g. which grid rows the latents render) are the training loss before
    its mean, centred targets and free latents included."""
    torch.manual_seed(0)
    aligner = Aligner(8, {"t": 6}, width=16, center=True, slots=4)
    states, feats = torch.randn(3, 5, 8), torch.randn(3, 9, 6)
    per = aligner.patch_losses("t", states, feats, (3, 3))
    assert per.shape == (3, 9) and bool(((per >= 0) & (per <= 2)).all())
    loss, _ = aligner.loss(states, {"t": [(i, feats[i], (3, 3)) for i in range(3)]})
    torch.testing.assert_close(per.mean(), loss)
    one = aligner.patch_losses("t", states[1:2], feats[1:2], (3, 3))
    torch.testing.assert_close(one[0], per[1])  # a segment's losses do not depend on the others
    # one segment against several images at once (the segment-view probe) = one image at a time
    against_all = aligner.patch_losses("t", states[1:2], feats, (3, 3))
    assert against_all.shape == (3, 9)
    for v in range(3):
        torch.testing.assert_close(against_all[v], aligner.patch_losses("t", states[1:2], feats[v:v + 1], (3, 3))[0])


def test_multi_teacher_mean_and_mixed_grids():
    torch.manual_seed(0)
    aligner = Aligner(8, {"a": 5, "b": 7}, width=16)
    states = torch.randn(3, 4, 8)
    targets = {"a": [(0, torch.randn(4, 5), (2, 2)), (2, torch.randn(9, 5), (3, 3))],
               "b": [(1, torch.randn(6, 7), (2, 3))]}
    loss, per = aligner.loss(states, targets)
    torch.testing.assert_close(loss, (per["a"] + per["b"]) / 2)


def _save_encoder(kind: str, path):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        Siglip2VisionConfig,
        Siglip2VisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = {
        "dinov2": lambda: Dinov2Model(Dinov2Config(image_size=56, patch_size=14, **small)),
        "dinov3": lambda: DINOv3ViTModel(DINOv3ViTConfig(image_size=64, patch_size=16, num_register_tokens=4,
                                                         **small)),
        "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=16, **small)),
        "clip": lambda: CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=16, **small)),
        "siglip2": lambda: Siglip2VisionModel(Siglip2VisionConfig(patch_size=16, num_patches=16, **small)),
    }[kind]()
    model.save_pretrained(path)


@pytest.mark.parametrize("kind, size, grid", [("dinov2", 56, (4, 4)), ("dinov3", 64, (4, 4)),
                                              ("siglip", 64, (4, 4)), ("clip", 64, (4, 4))])
def test_hf_teachers_drop_prefix_tokens(tmp_path, image_dir, kind, size, grid):
    _save_encoder(kind, tmp_path / kind)
    teacher = build_teacher(TeacherSpec(name=kind, kind="hf", path=str(tmp_path / kind), image_size=size))
    feats = teacher.encode([Image.open(image_dir / "a.png"), Image.open(image_dir / "b.png")])
    assert [f.shape for f, _ in feats] == [(grid[0] * grid[1], 32)] * 2 and feats[0][1] == grid
    assert teacher.dim == 32 and not any(p.requires_grad for p in teacher.model.parameters())


def test_siglip2_naflex_grid_follows_aspect(tmp_path, image_dir):
    _save_encoder("siglip2", tmp_path / "s2")
    teacher = build_teacher(TeacherSpec(name="s2", path=str(tmp_path / "s2"), max_patches=16))
    (wide, g_wide), (tall, g_tall) = teacher.encode([Image.open(image_dir / "c.png"), Image.open(image_dir / "b.png")])
    assert g_wide[1] > g_wide[0] and g_tall[0] > g_tall[1]
    assert wide.shape[0] == g_wide[0] * g_wide[1] <= 16


def test_self_teacher_and_plugins(tiny, image_dir):
    model, tok, _, bb, latent = tiny
    self_t = build_teacher(TeacherSpec(name="qe", kind="self"), bb)
    ((f, grid),) = self_t.encode([Image.open(image_dir / "a.png")])
    assert grid == (4, 4) and f.shape == (16, bb.hidden_size)

    class Constant:
        def __init__(self, spec, backbone=None):
            self.name, self.id, self.dim = spec.name, "const", 3

        def encode(self, images):
            return [(torch.ones(4, 3), (2, 2)) for _ in images]

    register_teacher("constant-test", Constant)
    t = build_teacher(TeacherSpec(name="pi3", kind="constant-test"))
    assert t.encode([Image.open(image_dir / "a.png")])[0][1] == (2, 2)
    with pytest.raises(ValueError, match="unknown teacher kind 'nope'"):
        build_teacher(TeacherSpec(name="x", kind="nope"))
    with pytest.raises(ValueError, match="not a local directory"):
        build_teacher(TeacherSpec(name="x", kind="hf", path="/does/not/exist"))


def _tiny_dinov2():
    """A random 1-layer DINOv2 encoder on 56 px images (a 4 x 4 patch grid of 16-dim features)."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(image_size=56, patch_size=14, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32))


def _dino_objective(tiny, records, **cfg):
    """A stage-2 objective (K = 4, layer 2, lambda 0.5) with a tiny DINOv2 teacher, a batch of the records, and
    the teacher's encoder."""
    model, tok, _, bb, latent = tiny
    model.train()
    enc = _tiny_dinov2()
    teacher = HFVisionTeacher(TeacherSpec(name="dino", image_size=56), model=enc)
    obj = Objective(bb, ValrConfig(k=4, align_layer=2, lambda_align=0.5, projector_width=32, **cfg),
                    teachers=[teacher])
    return obj, make_batch(records, tok, bb, LayoutConfig(k=4), latent), enc


def test_feature_cache_hits_and_rejects_other_teachers(tmp_path, image_dir):
    enc = _tiny_dinov2()
    teacher = HFVisionTeacher(TeacherSpec(name="d", image_size=56), model=enc)
    cache = FeatureCache(tmp_path / "cache", teacher)
    paths = [image_dir / "a.png", image_dir / "b.png", image_dir / "a.png"]
    first = target_features(teacher, paths, cache)
    calls = []
    teacher.encode = lambda ims: calls.append(len(ims)) or []
    second = target_features(teacher, paths, cache)
    assert calls == [] and all(torch.equal(first[p][0], second[p][0]) for p in first)
    cache.flush()  # features persist across processes: a fresh object reads the shards back
    reopened = FeatureCache(tmp_path / "cache", teacher)
    assert len(reopened) == 2 and torch.equal(reopened.get(image_dir / "b.png")[0], first[image_dir / "b.png"][0])
    # the same teacher name with another encoder id (other model or resolution) is refused when opened
    other_teacher = HFVisionTeacher(TeacherSpec(name="d", image_size=56), model=enc)
    other_teacher.id = "another-encoder"
    with pytest.raises(FeatureCacheMismatch, match=f"made by encoder '{teacher.id}'.*is encoder 'another-encoder'"):
        FeatureCache(tmp_path / "cache", other_teacher)
    # a shard copied by hand into another encoder's cache directory is detected from its metadata
    renamed = HFVisionTeacher(TeacherSpec(name="d2", image_size=56), model=enc)
    renamed.id = "another-encoder"
    FeatureCache(tmp_path / "cache", renamed)
    for f in cache.dir.glob("shard-*.safetensors"):
        (tmp_path / "cache" / "d2" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FeatureCacheMismatch, match=f"written by teacher '{teacher.id}', not 'another-encoder'"):
        FeatureCache(tmp_path / "cache", renamed)


def test_stage2_gradients_reach_projector_and_llm_not_teacher(tiny, records, tmp_path):
    model = tiny[0]
    obj, batch, enc = _dino_objective(tiny, records, feature_cache=str(tmp_path / "fc"))
    parts = obj.stage2(batch)
    assert parts.n_aligned_segments == 5  # 2 + 2 (one step without target) + 1
    assert 0.0 < float(parts.align) < 2.0
    torch.testing.assert_close(parts.loss, parts.ce + 0.5 * parts.align)
    parts.loss.backward()
    assert obj.aligner.projectors["dino"].net[0].weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    assert "latent_norm" in parts.logs() and "align/dino" in parts.logs()


def test_alignment_only_stage2_has_exactly_the_alignment_gradient(tiny, records):
    """valr.ce_weight = 0 (an alignment-only warm-up): the loss and every gradient are lambda x the alignment's."""
    obj, batch, _ = _dino_objective(tiny, records, ce_weight=0.0)
    parts = obj.stage2(batch, mode="exact")
    assert float(parts.ce) > 0.5  # computed and logged, just not trained
    torch.testing.assert_close(parts.loss, 0.5 * parts.align)
    params = [p for p in obj.parameters() if p.requires_grad]
    got = torch.autograd.grad(parts.loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(0.5 * parts.align, params, retain_graph=True, allow_unused=True)
    with_ce = torch.autograd.grad(parts.ce + 0.5 * parts.align, params, allow_unused=True)
    n = 0
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w)
        n += 1
    assert n > 0
    assert any(w is not None and c is not None and not torch.allclose(w, c)
               for w, c in zip(want, with_ce, strict=True))  # the CE would have moved them


def test_objective_config_errors(tiny):
    model, tok, _, bb, latent = tiny
    with pytest.raises(ValueError, match="perfect square"):
        Objective(bb, ValrConfig(k=8, lambda_align=0.0))
    with pytest.raises(ValueError, match="no teachers are configured"):
        Objective(bb, ValrConfig(k=4, lambda_align=0.5))
    obj = Objective(bb, ValrConfig(k=4, lambda_align=0.0))  # latents without alignment need no teacher
    with pytest.raises(ValueError, match="ce_weight=0.0: use a weight >= 0, and 0 only with lambda_align > 0"):
        Objective(bb, ValrConfig(k=4, lambda_align=0.0, ce_weight=0.0))  # nothing to train
    assert obj.aligner is None


def test_projector_is_repa_shaped():
    p = Projector(8, 5, width=16)
    assert [type(m).__name__ for m in p.net] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]


def test_mean_feature_loss_is_the_loss_of_always_predicting_the_mean():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(8, generator=g) * 3
    feats = common + torch.randn(40, 16, 8, generator=g)  # (images, patches, D) with a shared component
    mean = feats.reshape(-1, 8).mean(0)
    assert mean_feature_loss(feats) == pytest.approx(float(cosine_distance(mean.expand_as(feats), feats)), abs=1e-5)
    assert mean_feature_loss(feats) < mean_feature_loss(feats - mean)  # a shared component makes the mean cheap
    assert mean_feature_loss(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-6)


def test_centred_targets_deny_the_constant_prediction():
    g = torch.Generator().manual_seed(1)
    common = torch.randn(8, generator=g) * 5
    feats = common + torch.randn(6, 16, 8, generator=g)  # (segments, patches, D)
    constant = common.expand_as(feats)
    raw, centred = Aligner(4, {"t": 8}), Aligner(4, {"t": 8}, center=True)
    assert torch.allclose(centred.targets(feats).mean(1), torch.zeros(6, 8), atol=1e-5)
    assert torch.equal(raw.targets(feats), feats)
    assert float(cosine_distance(constant, raw.targets(feats))) < 0.1  # the mean wins the raw loss
    assert float(cosine_distance(constant, centred.targets(feats))) > 0.8  # and gains ~nothing once centred


def test_position_mean_loss_is_the_plateau_of_slots_that_know_only_their_position():
    torch.manual_seed(0)
    cell = torch.randn(1, 4, 8) * 3  # what each position holds in every image
    feats = cell + 0.1 * torch.randn(50, 4, 8)
    # by hand: per position, the mean over images, after centring each image over its patches
    c = feats - feats.mean(1, keepdim=True)
    want = 1 - torch.nn.functional.cosine_similarity(c, c.mean(0, keepdim=True).expand_as(c), dim=-1).mean()
    assert position_mean_loss(feats, center=True) == pytest.approx(float(want), abs=1e-6)
    assert position_mean_loss(feats) < 0.01  # positions explain almost everything here
    assert position_mean_loss(feats) < mean_feature_loss(feats.reshape(-1, 8))  # a mean over positions does not
    noise = torch.randn(200, 4, 8)  # nothing shared: knowing the position gains nothing
    assert position_mean_loss(noise, center=True) > 0.9
    with pytest.raises(ValueError, match="images, patches, dim"):
        position_mean_loss(torch.zeros(4, 8))


def test_cache_sample_reads_pending_and_written_features_and_feeds_the_mean_baseline(tmp_path):
    from valr.demo import cache_alignment_baselines
    from valr.teachers import sample_cached_features

    class Fixed:  # just what a cache needs of a teacher
        name, id, dim = "t", "fixed-encoder", 3

    cache = FeatureCache(tmp_path / "cache", Fixed(), shard_size=2)
    feats = [torch.randn(4, 3) for _ in range(5)]
    for i, f in enumerate(feats):
        cache.put_key(f"k{i}", f, (2, 2))  # shard_size 2: two shards written, one image still pending
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 2
    sample = cache.sample()
    assert sample.shape == (20, 3)
    assert sorted(map(tuple, sample.tolist())) == sorted(map(tuple, torch.cat(feats).tolist()))
    assert cache.sample(limit=2).shape == (8, 3)
    on_disk = sample_cached_features(cache.dir)
    assert on_disk.shape == (16, 3)  # the pending image is not on disk yet
    got = cache_alignment_baselines(tmp_path / "cache", center=True)
    assert got["t"]["mean_feature"] == pytest.approx(mean_feature_loss(on_disk))
    assert got["t"]["position_mean"] == pytest.approx(position_mean_loss(torch.stack(feats[:4]), center=True))
    assert sample_cached_features(tmp_path / "nothing").numel() == 0
