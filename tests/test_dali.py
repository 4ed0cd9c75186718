"""DALI backend on CPU operators (device_id=None): Batch contract, parity with the torch backend
(exact without shift-scale-rotate, distortion and dropout included; shift-scale-rotate geometry
approximately, away from the border), params/batch pairing through deep prefetching, resume,
folder (encoded) decoding + post-stage."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ucseg_fast.data.dali import dali_unavailable_reason

pytestmark = [pytest.mark.dali, pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                   reason=str(dali_unavailable_reason()))]

CLASSES = {0, 1, 2, 3}
# distort_p = 1 with a visible elastic field (alpha 300, sigma 50: ~1 px), dropout_p = 1
ALL_ON = dict(distort_p=1.0, dropout_p=1.0, elastic_alpha=300.0)


N_LABELED = 56  # the synthetic set's first 7 patients (conftest.SYNTH_ACDC); 24 unlabeled


@pytest.fixture(scope="module")
def cache(synth_acdc):
    from ucseg_fast.data import SSL4MISDataset
    return SSL4MISDataset(synth_acdc).load_slices(size=(64, 64))


@pytest.fixture
def deep_prefetch(monkeypatch):
    """CPU pipeline with 3 batches in flight (as a GPU pipeline's queue): pairing must hold."""
    import ucseg_fast.data.dali as D
    monkeypatch.setattr(D, "_PREFETCH_DEPTH_CPU", 3)


def _force(monkeypatch, **over):
    """Patch draw_params in both backends: same random draws, some fields forced (e.g. the
    OneOf choice use_grid). Returns the patched function (also records what it drew)."""
    import ucseg_fast.data.augment as A
    import ucseg_fast.data.dali as D
    orig = A.draw_params

    def draw(*args, **kw):
        p = orig(*args, **kw)
        p = dataclasses.replace(p, **{k: torch.full_like(getattr(p, k), v) for k, v in over.items()})
        draw.drawn.append(p)
        return p

    draw.drawn = []
    monkeypatch.setattr(A, "draw_params", draw)
    monkeypatch.setattr(D, "draw_params", draw)
    return draw


def _pair(cache, aug, seed=3):
    from ucseg_fast.data import TrainStream
    from ucseg_fast.data.dali import DaliTrainStream
    imgs, labs = cache
    kw = dict(n_labeled=N_LABELED, labeled_bs=4, unlabeled_bs=4, seed=seed, augment=aug)
    return TrainStream.from_tensors(imgs, labs, **kw), DaliTrainStream(imgs, labs, **kw)


def _replay(cache, aug, draw, seed=3, steps=1, bl=4):
    """`steps` batches of a fresh torch-backend stream's sampler + generator, augmented stage by
    stage in the DALI backend's order: flips + shift-scale-rotate (torch, reflect border), then the
    post-stage (distortion, dropout). Also returns the same batches without the distortion."""
    from ucseg_fast.data import TrainStream
    from ucseg_fast.data.augment import apply_stages
    imgs, labs = cache
    ts = TrainStream.from_tensors(imgs, labs, n_labeled=N_LABELED, labeled_bs=bl, unlabeled_bs=4, seed=seed)
    draw_kw = {k: v for k, v in aug.items() if k != "elastic_alpha"}
    out = []
    for _ in range(steps):
        lab, unl = next(ts.sampler)
        idx = torch.from_numpy(np.concatenate([lab, unl]))
        p = draw(len(idx), 64, 64, ts.generator, device="cpu", **draw_kw)
        x, y = apply_stages(imgs[idx].unsqueeze(1), labs[idx[:bl]], p, distortion=False, dropout=False)
        plain = apply_stages(x, y, p, flips=False, ssr=False, distortion=False)
        full = apply_stages(x, y, p, flips=False, ssr=False, elastic_alpha=aug.get("elastic_alpha", 1.0))
        out.append((full, plain))
    return out


def _cat(b):
    return torch.cat([b.x_l, b.x_u])[:, :1]


def test_dali_equals_torch_flips_and_dropout(cache):
    ts, dl = _pair(cache, dict(ssr_p=0.0, distort_p=0.0))
    for _ in range(3):
        a, b = ts.next(), dl.next()
        assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (4, 3, 64, 64)
        assert b.x_l.dtype == torch.float32 and b.y_l.dtype == torch.int64
        assert torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "elastic"])
def test_dali_equals_torch_all_stages_without_ssr(cache, monkeypatch, deep_prefetch, grid):
    # flips (p .5) -> distortion (p 1, one kind forced) -> dropout (p 1): the whole DALI output
    # equals the torch backend's bit for bit, and each prefetched batch got its own parameters.
    draw = _force(monkeypatch, use_grid=grid)
    aug = dict(ssr_p=0.0, **ALL_ON)
    ts, dl = _pair(cache, aug)
    replay = _replay(cache, aug, draw, steps=3)
    for (_, (x_plain, _)) in replay:
        a, b = ts.next(), dl.next()
        assert torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)
        assert set(torch.unique(b.y_l).tolist()) <= CLASSES
        assert (_cat(b) - x_plain).abs().mean() > 2e-3  # the distortion did move pixels
        assert (_cat(b) == 0).flatten(1).sum(1).min() >= 5 * 3 * 3  # >= 5 holes of 3x3 per image
    assert all(bool(p.distort_on.all()) and bool((p.use_grid == grid).all()) for p in draw.drawn)


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "elastic"])
def test_dali_all_stages_with_ssr(cache, monkeypatch, grid):
    draw = _force(monkeypatch, use_grid=grid)
    aug = dict(ssr_p=1.0, **ALL_ON)
    ts, dl = _pair(cache, aug)
    inner = (..., slice(12, -12), slice(12, -12))  # SSR border: DALI clamps, torch reflects
    for ((x_o, y_o), _) in _replay(cache, aug, draw, steps=2):
        a, b = ts.next(), dl.next()
        assert set(torch.unique(b.y_l).tolist()) <= CLASSES
        # The same stages in the same order in torch: equal up to DALI's bilinear weights.
        assert (_cat(b) - x_o)[inner].abs().max() < 1e-4
        assert torch.equal(b.y_l[inner], y_o[inner].long())
        # The torch backend composes SSR + distortion into one resampling (DALI: two, as the
        # reference): close, not equal.
        assert (_cat(b) - _cat(a))[inner].abs().mean() < 0.02
        assert (b.y_l[inner] == a.y_l[inner]).float().mean() > 0.97


def test_dali_ssr_geometry_matches_torch(cache):
    ts, dl = _pair(cache, dict(hflip_p=0.0, vflip_p=0.0, ssr_p=1.0, distort_p=0.0, dropout_p=0.0))
    a, b = ts.next(), dl.next()
    d = (a.x_l - b.x_l).abs()
    assert d[..., 8:-8, 8:-8].max() < 1e-4  # borders differ: DALI clamps, torch reflects
    assert (a.y_l[:, 8:-8, 8:-8] == b.y_l[:, 8:-8, 8:-8]).float().mean() > 0.995


@pytest.mark.parametrize("aug", [dict(distort_p=0.0), dict(ssr_p=1.0, **ALL_ON)], ids=["default", "all_on"])
def test_image_equal_label_map_same_geometry(cache, aug):
    from ucseg_fast.data.dali import DaliTrainStream
    _, labs = cache
    dl = DaliTrainStream(labs.float(), labs, n_labeled=N_LABELED, labeled_bs=6, unlabeled_bs=2, seed=1, augment=aug)
    for _ in range(2):
        b = dl.next()
        assert set(torch.unique(b.y_l).tolist()) <= CLASSES
        # bilinear image vs nearest label of the same maps: equal wherever the image is integral
        x = b.x_l[:, 0]
        integral = (x - x.round()).abs() < 1e-4
        assert integral.float().mean() > 0.85
        assert torch.equal(x.round()[integral].long(), b.y_l[integral])


@pytest.mark.parametrize("depth", [1, 3])
def test_dali_resume_exact(cache, monkeypatch, depth):
    import ucseg_fast.data.dali as D
    from ucseg_fast.data.dali import DaliTrainStream
    monkeypatch.setattr(D, "_PREFETCH_DEPTH_CPU", depth)
    imgs, labs = cache
    kw = dict(n_labeled=N_LABELED, labeled_bs=4, unlabeled_bs=4, seed=5,
              augment=dict(distort_p=0.5, dropout_p=0.5, elastic_alpha=300.0))
    s = DaliTrainStream(imgs, labs, **kw)
    s.next()
    state = s.state_dict()
    want = [s.next() for _ in range(3)]
    t = DaliTrainStream(imgs, labs, **kw)
    t.load_state_dict(state)
    s.load_state_dict(state)  # the same stream, with batches (and their params) in flight
    for w in want:
        for g in (t.next(), s.next()):
            assert torch.equal(w.x_l, g.x_l) and torch.equal(w.y_l, g.y_l) and torch.equal(w.x_u, g.x_u)


def test_dali_folder_decodes_like_torch(tmp_path, synth_acdc, monkeypatch):
    from ucseg_fast.config import load_config
    from ucseg_fast.data.augment import apply_stages
    from ucseg_fast.data.factory import build_train_stream
    from ucseg_fast.data.folders import FolderDataset, export_folder
    export_folder(synth_acdc, tmp_path, fmt="png", labeled_patients=3, max_val_volumes=0)
    ov = [f"--data.root='{tmp_path}'", "--data.format=folder", "--data.img_size=[64,64]",
          "--data.labeled_bs=4", "--data.unlabeled_bs=3", "--data.backend=dali",
          "--loss.phase2_start=50000"]  # unequal halves: no copy-paste phase
    ref, _ = FolderDataset(tmp_path, num_classes=4).load_split("unlabeled", (64, 64), with_labels=False)

    s = build_train_stream(load_config(None, ov + ["--data.augment=false"]).data, device="cpu", seed=0)
    b = s.next()
    assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (3, 3, 64, 64)
    # the unlabeled images went through DALI's decoder + OpenCV-rule nearest resize: each one
    # equals one of the torch-decoded (PIL) unlabeled images exactly
    for x in b.x_u[:, 0]:
        assert ((ref[:, 0] - x).abs().amax(dim=(1, 2)) < 1e-6).any()

    # With distortion (grid forced) and dropout on, the post-stage runs on the decoded batch too,
    # with the parameters the unlabeled source drew for it (its first batch of 3).
    draw = _force(monkeypatch, use_grid=True)
    aug = ["--data.hflip_p=0.5", "--data.ssr_p=0", "--data.distort_p=1", "--data.dropout_p=1"]
    s = build_train_stream(load_config(None, ov + aug).data, device="cpu", seed=0)
    b = s.next()
    p = next(q for q in draw.drawn if q.hflip.shape[0] == 3)
    n = ref.shape[0]
    for i, x in enumerate(b.x_u[:, 0]):
        p_i = dataclasses.replace(p, **{f.name: getattr(p, f.name)[[i] * n] for f in dataclasses.fields(p)
                                        if isinstance(getattr(p, f.name), torch.Tensor)})
        cand, _ = apply_stages(ref, None, p_i)  # every unlabeled image under sample i's parameters
        plain, _ = apply_stages(ref, None, p_i, distortion=False)
        hit = (cand[:, 0] - x).abs().amax(dim=(1, 2)) < 1e-6
        assert hit.sum() >= 1
        assert (plain[hit][:, 0] - x).abs().max() > 0.05  # and the distortion did change it
