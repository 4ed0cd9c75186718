"""DALI backend on CPU operators (device_id=None): Batch contract, exact parity with the torch
backend for flips + dropout, shift-scale-rotate geometry, resume, folder (encoded) decoding."""
from __future__ import annotations

import pytest
import torch

from ucseg_fast.data.dali import dali_unavailable_reason

pytestmark = [pytest.mark.dali, pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                   reason=str(dali_unavailable_reason()))]


@pytest.fixture(scope="module")
def cache():
    from conftest import ACDC_ROOT
    from ucseg_fast.data import SSL4MISDataset
    if not (ACDC_ROOT / "train_slices.list").exists():
        pytest.skip("ACDC subset missing")
    return SSL4MISDataset(ACDC_ROOT).load_slices(size=(64, 64))


def _pair(cache, aug, seed=3):
    from ucseg_fast.data import TrainStream
    from ucseg_fast.data.dali import DaliTrainStream
    imgs, labs = cache
    kw = dict(n_labeled=136, labeled_bs=4, unlabeled_bs=4, seed=seed, augment=aug)
    return TrainStream.from_tensors(imgs, labs, **kw), DaliTrainStream(imgs, labs, **kw)


def test_dali_equals_torch_flips_and_dropout(cache):
    ts, dl = _pair(cache, dict(ssr_p=0.0, distort_p=0.0))
    for _ in range(3):
        a, b = ts.next(), dl.next()
        assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (4, 3, 64, 64)
        assert b.x_l.dtype == torch.float32 and b.y_l.dtype == torch.int64
        assert torch.equal(a.x_l, b.x_l) and torch.equal(a.y_l, b.y_l) and torch.equal(a.x_u, b.x_u)


def test_dali_ssr_geometry_matches_torch(cache):
    ts, dl = _pair(cache, dict(hflip_p=0.0, vflip_p=0.0, ssr_p=1.0, distort_p=0.0, dropout_p=0.0))
    a, b = ts.next(), dl.next()
    d = (a.x_l - b.x_l).abs()
    assert d[..., 8:-8, 8:-8].max() < 1e-4  # borders differ: DALI clamps, torch reflects
    assert (a.y_l[:, 8:-8, 8:-8] == b.y_l[:, 8:-8, 8:-8]).float().mean() > 0.995


def test_image_equal_label_map_same_geometry(cache):
    from ucseg_fast.data.dali import DaliTrainStream
    _, labs = cache
    dl = DaliTrainStream(labs.float(), labs, n_labeled=136, labeled_bs=6, unlabeled_bs=2, seed=1,
                         augment=dict(distort_p=0.0))
    for _ in range(2):
        b = dl.next()
        assert set(torch.unique(b.y_l).tolist()) <= {0, 1, 2, 3}
        # bilinear image vs nearest label of the same map: equal wherever the image is integral
        x = b.x_l[:, 0]
        integral = (x - x.round()).abs() < 1e-4
        assert integral.float().mean() > 0.9
        assert torch.equal(x.round()[integral].long(), b.y_l[integral])


def test_dali_resume_exact(cache):
    from ucseg_fast.data.dali import DaliTrainStream
    imgs, labs = cache
    kw = dict(n_labeled=136, labeled_bs=4, unlabeled_bs=4, seed=5, augment=dict(distort_p=0.0))
    s = DaliTrainStream(imgs, labs, **kw)
    s.next()
    state = s.state_dict()
    want = [s.next() for _ in range(2)]
    t = DaliTrainStream(imgs, labs, **kw)
    t.load_state_dict(state)
    for w in want:
        g = t.next()
        assert torch.equal(w.x_l, g.x_l) and torch.equal(w.y_l, g.y_l) and torch.equal(w.x_u, g.x_u)


def test_dali_folder_decodes_like_torch(tmp_path, cache):
    from conftest import ACDC_ROOT
    from ucseg_fast.config import load_config
    from ucseg_fast.data.factory import build_train_stream
    from ucseg_fast.data.folders import FolderDataset, export_folder
    export_folder(ACDC_ROOT, tmp_path, fmt="png", labeled_patients=3, max_val_volumes=0)
    ov = [f"--data.root='{tmp_path}'", "--data.format=folder", "--data.img_size=[64,64]",
          "--data.labeled_bs=4", "--data.unlabeled_bs=4", "--data.augment=false", "--data.backend=dali"]
    s = build_train_stream(load_config(None, ov).data, device="cpu", seed=0)
    b = s.next()
    assert b.x_l.shape == (4, 3, 64, 64) and b.x_u.shape == (4, 3, 64, 64)
    # the unlabeled images went through DALI's decoder + OpenCV-rule nearest resize: each one
    # equals one of the torch-decoded (PIL) unlabeled images exactly
    ref, _ = FolderDataset(tmp_path, num_classes=4).load_split("unlabeled", (64, 64), with_labels=False)
    for x in b.x_u[:, 0]:
        assert ((ref[:, 0] - x).abs().amax(dim=(1, 2)) < 1e-6).any()
