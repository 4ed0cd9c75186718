"""3D sliding-window inference and test protocol against a literal port of the reference loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ucseg_fast.eval import (evaluate_cases_3d, predict_case_3d, segmentation_metrics,
                             sliding_window_probability)
from ucseg_fast.eval.sliding_window import EMPTY_PRED_DISTANCE_3D, window_starts

PATCH = (16, 16, 16)


def fake_predict_fn(calls=None, in_channels=1):
    """Logits from the patch contents, the voxel's place in the patch and the patch maximum:
    a voxel gets a different value from every window covering it, so overlaps matter. Every
    operation is per batch item (elementwise, max), so batching cannot change a value."""
    def fn(x):
        if calls is not None:
            calls.append(tuple(x.shape))
        assert x.dtype == torch.float32 and x.ndim == 5 and x.shape[1] == in_channels
        for c in range(1, in_channels):
            assert torch.equal(x[:, 0], x[:, c])
        v = x[:, 0]
        a, b, c = (torch.arange(n, dtype=torch.float32) for n in v.shape[1:])
        pos = a[:, None, None] * 0.031 - b[None, :, None] * 0.017 + c[None, None, :] * 0.023
        pmax = v.amax(dim=(1, 2, 3), keepdim=True)
        fg = 6.0 * (v - 0.5) + pos - 0.2 * pmax
        return torch.stack([-0.5 * fg, fg], dim=1)
    return fn


def reference_test_single_case(predict_fn, image, stride_xy, stride_z, patch_size,
                               num_classes=2):
    """Literal numpy port of UC-Seg's ``test_single_case`` (3D ``prediction.py``), batch 1."""
    w, h, d = image.shape
    add_pad = False
    if w < patch_size[0]:
        w_pad = patch_size[0] - w
        add_pad = True
    else:
        w_pad = 0
    if h < patch_size[1]:
        h_pad = patch_size[1] - h
        add_pad = True
    else:
        h_pad = 0
    if d < patch_size[2]:
        d_pad = patch_size[2] - d
        add_pad = True
    else:
        d_pad = 0
    wl_pad, wr_pad = w_pad // 2, w_pad - w_pad // 2
    hl_pad, hr_pad = h_pad // 2, h_pad - h_pad // 2
    dl_pad, dr_pad = d_pad // 2, d_pad - d_pad // 2
    if add_pad:
        image = np.pad(image, [(wl_pad, wr_pad), (hl_pad, hr_pad), (dl_pad, dr_pad)],
                       mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape).astype(np.float32)
    cnt = np.zeros(image.shape).astype(np.float32)
    for x in range(0, sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(0, sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(0, sz):
                zs = min(stride_z * z, dd - patch_size[2])
                test_patch = image[xs:xs + patch_size[0], ys:ys + patch_size[1],
                                   zs:zs + patch_size[2]]
                test_patch = np.expand_dims(np.expand_dims(test_patch, axis=0),
                                            axis=0).astype(np.float32)
                with torch.no_grad():
                    y = torch.nn.Sigmoid()(predict_fn(torch.from_numpy(test_patch)))
                y = y.cpu().data.numpy()[0, 1]
                score_map[:, xs:xs + patch_size[0], ys:ys + patch_size[1],
                          zs:zs + patch_size[2]] += y
                cnt[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += 1
    score_map = score_map / np.expand_dims(cnt, axis=0)
    label_map = (score_map[0] > 0.5).astype(np.int32)
    if add_pad:
        label_map = label_map[wl_pad:wl_pad + w, hl_pad:hl_pad + h, dl_pad:dl_pad + d]
        score_map = score_map[:, wl_pad:wl_pad + w, hl_pad:hl_pad + h, dl_pad:dl_pad + d]
    return label_map, score_map, (sx, sy, sz)


def reference_largest_cc(segmentation):
    """``getLargestCC`` with scipy's 26-connected labelling in place of skimage's."""
    labels, _ = ndimage.label(segmentation, structure=np.ones((3, 3, 3)))
    if labels.max() != 0:
        return labels == np.argmax(np.bincount(labels.flat)[1:]) + 1
    return segmentation


def blob_image(shape, seed, n_blobs=4):
    """Smooth blobs in [0, 1] plus noise: several components after the threshold."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    img = np.zeros(shape, np.float64)
    for _ in range(n_blobs):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(2.0, 5.0)
        img += np.exp(-((grid - centre) ** 2).sum(-1) / (2 * radius ** 2))
    return np.clip(img + 0.15 * rng.random(shape), 0, 1).astype(np.float32)


# axes smaller than, equal to and larger than the patch; strides that do not divide
SHAPES = [(16, 16, 16), (11, 16, 23), (29, 9, 16), (7, 5, 3), (33, 21, 18)]


@pytest.mark.parametrize("shape", SHAPES)
def test_probability_equals_reference_loop(shape):
    img = blob_image(shape, seed=sum(shape))
    calls: list = []
    prob = sliding_window_probability(fake_predict_fn(calls), img, patch=PATCH, stride_xy=5,
                                      stride_z=3, batch_size=4, device="cpu")
    ref_label, ref_score, (sx, sy, sz) = reference_test_single_case(
        fake_predict_fn(), img, 5, 3, PATCH)
    assert prob.dtype == torch.float32 and tuple(prob.shape) == shape
    np.testing.assert_array_equal(prob.numpy(), ref_score[0])  # bit for bit
    np.testing.assert_array_equal((prob > 0.5).numpy(), ref_label.astype(bool))
    assert sum(c[0] for c in calls) == sx * sy * sz
    assert all(c[1:] == (1, *PATCH) and c[0] <= 4 for c in calls)


def test_window_starts_formula():
    for n in range(16, 60):
        for stride in (1, 3, 5, 16, 18):
            starts = window_starts(n, 16, stride)
            assert len(starts) == math.ceil((n - 16) / stride) + 1
            assert starts[0] == 0 and starts[-1] == n - 16
            assert starts == [min(stride * i, n - 16) for i in range(len(starts))]
    assert window_starts(96, 96, 18) == [0]
    assert window_starts(160, 96, 18) == [0, 18, 36, 54, 64]
    assert len(window_starts(120, 96, 4)) == 7
    with pytest.raises(ValueError, match="shorter"):
        window_starts(10, 16, 4)


def test_batch_size_and_input_type_invariance():
    img = blob_image((27, 19, 22), seed=3)
    fn = fake_predict_fn()
    ref = sliding_window_probability(fn, img, patch=PATCH, stride_xy=5, stride_z=3,
                                     batch_size=1, device="cpu")
    for bs in (2, 3, 7, 1000):
        out = sliding_window_probability(fn, img, patch=PATCH, stride_xy=5, stride_z=3,
                                         batch_size=bs, device="cpu")
        assert torch.equal(out, ref), bs
    as_tensor = sliding_window_probability(fn, torch.from_numpy(img.astype(np.float64)),
                                           patch=PATCH, stride_xy=5, stride_z=3)
    assert as_tensor.device.type == "cpu" and torch.equal(as_tensor, ref)
    three = sliding_window_probability(fake_predict_fn(in_channels=3), img, patch=PATCH,
                                       stride_xy=5, stride_z=3, device="cpu", in_channels=3)
    assert torch.equal(three, ref)


def test_bad_predict_fn_and_arguments():
    img = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(ValueError, match="expected"):
        sliding_window_probability(lambda x: x[:, :, :8], img, patch=PATCH, device="cpu")
    with pytest.raises(TypeError, match="tuple"):
        sliding_window_probability(lambda x: (x, x), img, patch=PATCH, device="cpu")
    with pytest.raises(ValueError, match="patch"):
        sliding_window_probability(fake_predict_fn(), img, patch=(16, 16), device="cpu")
    with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
        sliding_window_probability(fake_predict_fn(), img[0], patch=PATCH, device="cpu")


@pytest.mark.parametrize("shape", [(30, 26, 21), (12, 31, 17)])
def test_threshold_and_largest_cc_equal_reference(shape):
    img = blob_image(shape, seed=sum(shape))
    ref_label, _, _ = reference_test_single_case(fake_predict_fn(), img, 5, 3, PATCH)
    n_cc = ndimage.label(ref_label, structure=np.ones((3, 3, 3)))[1]
    assert n_cc >= 2  # the filter has something to remove
    pred = predict_case_3d(fake_predict_fn(), img, patch=PATCH, stride_xy=5, stride_z=3,
                           device="cpu")
    assert pred.dtype == torch.int64 and tuple(pred.shape) == shape
    np.testing.assert_array_equal(pred.numpy(), reference_largest_cc(ref_label).astype(np.int64))
    assert 0 < pred.sum() < ref_label.sum()
    raw = predict_case_3d(fake_predict_fn(), img, patch=PATCH, stride_xy=5, stride_z=3,
                          device="cpu", nms=False)
    np.testing.assert_array_equal(raw.numpy(), ref_label)


def _mask_predict_fn(logit_value=8.0):
    """Foreground exactly where the image is > 0.5 (no dependence on the window)."""
    def fn(x):
        fg = torch.where(x[:, 0] > 0.5, logit_value, -logit_value)
        return torch.stack([-fg, fg], dim=1)
    return fn


def test_largest_cc_tie_goes_to_first_component_like_skimage():
    img = np.zeros((20, 18, 17), np.float32)
    img[2:5, 2:5, 2:5] = 1.0      # 27 voxels, first in C order
    img[12:15, 10:13, 9:12] = 1.0  # 27 voxels
    img[9, 16, 15] = 1.0          # 1 voxel, diagonal neighbours are separate components
    pred = predict_case_3d(_mask_predict_fn(), img, patch=PATCH, stride_xy=5, stride_z=3,
                           device="cpu").numpy()
    assert pred.sum() == 27 and pred[2:5, 2:5, 2:5].all()
    skl = pytest.importorskip("skimage.measure")
    labels = skl.label(img > 0.5)
    ref = labels == np.argmax(np.bincount(labels.flat)[1:]) + 1
    np.testing.assert_array_equal(pred, ref)
    diag = np.zeros((18, 18, 18), np.float32)
    diag[3, 3, 3] = diag[4, 4, 4] = diag[5, 5, 5] = 1.0  # 26-connected only
    diag[10:12, 10:12, 10] = 1.0                          # 4 voxels, 6-connected
    pred = predict_case_3d(_mask_predict_fn(), diag, patch=PATCH, stride_xy=5, stride_z=3,
                           device="cpu").numpy()
    assert pred.sum() == 4 and pred[10:12, 10:12, 10].all()


def metric_cases():
    """A ball GT; the image is a shifted, trimmed ball so the prediction is imperfect."""
    shape = (26, 22, 19)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    ball = ((grid - np.array([12.0, 10.0, 9.0])) ** 2).sum(-1)
    label = (ball < 36).astype(np.int64)
    shifted = ((grid - np.array([13.5, 9.0, 9.5])) ** 2).sum(-1)
    image = ((shifted < 30) & (grid[..., 2] < 13)).astype(np.float32)
    image[1, 1, 1] = 1.0  # a stray voxel that the largest-CC filter removes
    return [("ball", image, label)]


def test_perfect_prediction():
    _, _, label = metric_cases()[0]
    res = evaluate_cases_3d(_mask_predict_fn(), [("p", label.astype(np.float32), label)],
                            patch=PATCH, stride_xy=5, stride_z=3, device="cpu")
    assert res.mean() == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    assert res.summary.classes == (1,) and res.names == ("p",)


def test_empty_prediction_scores_0_0_100_100():
    _, _, label = metric_cases()[0]
    empty_gt = np.zeros_like(label)
    items = [("gt", np.zeros(label.shape, np.float32), label),
             ("both", np.zeros(label.shape, np.float32), empty_gt)]
    res = evaluate_cases_3d(_mask_predict_fn(), items, patch=PATCH, stride_xy=5, stride_z=3,
                            device="cpu")
    assert EMPTY_PRED_DISTANCE_3D == 100.0
    for r in res.per_volume:
        assert r.for_class(1) == {"dice": 0.0, "jaccard": 0.0, "hd95": 100.0, "asd": 100.0}
    assert res.mean() == {"dice": 0.0, "jaccard": 0.0, "hd95": 100.0, "asd": 100.0}
    assert res.summary.n_empty["pred_empty"].tolist() == [1]
    assert res.summary.n_empty["both_empty"].tolist() == [1]
    assert res.summary.n_empty["gt_empty"].tolist() == [0]
    # mixed with a scored case: the 100s enter the mean like the reference's np.mean
    mixed = evaluate_cases_3d(_mask_predict_fn(), items[:1] + metric_cases(), patch=PATCH,
                              stride_xy=5, stride_z=3, device="cpu")
    hd = [r.for_class(1)["hd95"] for r in mixed.per_volume]
    assert hd[0] == 100.0 and mixed.mean()["hd95"] == pytest.approx(np.mean(hd), abs=0)
    val = evaluate_cases_3d(_mask_predict_fn(), items, patch=PATCH, stride_xy=5, stride_z=3,
                            device="cpu", dice_only=True)
    assert val.summary.hd95 is None and val.mean() == {"dice": 0.0, "jaccard": 0.0}


def test_metrics_equal_medpy_reference():
    binary = pytest.importorskip("medpy.metric.binary")
    cases = metric_cases()
    res = evaluate_cases_3d(_mask_predict_fn(), cases, patch=PATCH, stride_xy=5, stride_z=3,
                            batch_size=3, device="cpu")
    name, image, label = cases[0]
    ref_label, _, _ = reference_test_single_case(_mask_predict_fn(), image, 5, 3, PATCH)
    y_pred = reference_largest_cc(ref_label).astype(bool)
    y_true = label == 1
    assert 0.5 < binary.dc(y_pred, y_true) < 0.99
    expected = {"dice": binary.dc(y_pred, y_true), "jaccard": binary.jc(y_pred, y_true),
                "hd95": binary.hd95(y_pred, y_true), "asd": binary.asd(y_pred, y_true)}
    got = res.per_volume[0].for_class(1)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    val = evaluate_cases_3d(_mask_predict_fn(), cases, patch=PATCH, stride_xy=5, stride_z=3,
                            device="cpu", dice_only=True)
    assert val.summary.hd95 is None and val.mean()["dice"] == got["dice"]


def test_per_item_spacing_and_strict_mode():
    cases = metric_cases()
    name, image, label = cases[0]
    pred = predict_case_3d(_mask_predict_fn(), image, patch=PATCH, stride_xy=5, stride_z=3,
                           device="cpu")
    res = evaluate_cases_3d(_mask_predict_fn(), [(name, image, label, (1.0, 1.0, 2.5))],
                            patch=PATCH, stride_xy=5, stride_z=3, device="cpu", mode="strict")
    ref = segmentation_metrics(pred, label, 2, spacing=(1.0, 1.0, 2.5), mode="strict")
    np.testing.assert_array_equal(res.per_volume[0].hd95, ref.hd95)
    assert res.summary.units == "spacing"
    empty = evaluate_cases_3d(_mask_predict_fn(), [("e", np.zeros_like(image), label)],
                              patch=PATCH, stride_xy=5, stride_z=3, device="cpu", mode="strict")
    assert np.isnan(empty.per_volume[0].hd95[0]) and empty.per_volume[0].dice[0] == 0.0


def test_shape_mismatch_names_the_case():
    img = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(ValueError, match="'bad'"):
        evaluate_cases_3d(_mask_predict_fn(), [("bad", img, np.zeros((20, 20, 19)))],
                          patch=PATCH, device="cpu")
    with pytest.raises(ValueError, match="no cases"):
        evaluate_cases_3d(_mask_predict_fn(), [], patch=PATCH, device="cpu")


def test_save_dir_writes_three_files(tmp_path):
    nib = pytest.importorskip("nibabel")
    cases = metric_cases()
    res = evaluate_cases_3d(_mask_predict_fn(), cases, patch=PATCH, stride_xy=5, stride_z=3,
                            device="cpu", save_dir=tmp_path / "out", dice_only=True)
    name, image, label = cases[0]
    pred = predict_case_3d(_mask_predict_fn(), image, patch=PATCH, stride_xy=5, stride_z=3,
                           device="cpu").numpy()
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {f"{name}_pred.nii.gz", f"{name}_img.nii.gz", f"{name}_gt.nii.gz"}
    for suffix, arr in (("pred", pred), ("img", image), ("gt", label)):
        loaded = np.asarray(nib.load(str(tmp_path / "out" / f"{name}_{suffix}.nii.gz")).dataobj)
        assert loaded.shape == image.shape  # NIfTI (x, y, z) = the array's (X, Y, Z)
        np.testing.assert_array_equal(loaded, arr)
    assert res.names == (name,)


@pytest.mark.gpu
def test_cuda_equals_cpu():
    img = blob_image((33, 21, 18), seed=5)
    fn = fake_predict_fn()
    cpu = sliding_window_probability(fn, img, patch=PATCH, stride_xy=5, stride_z=3,
                                     device="cpu")

    def fn_cuda(x):
        return fn(x.cpu()).cuda()

    gpu = sliding_window_probability(fn_cuda, img, patch=PATCH, stride_xy=5, stride_z=3,
                                     device="cuda")
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    pred_cpu = predict_case_3d(fn, img, patch=PATCH, stride_xy=5, stride_z=3, device="cpu")
    pred_gpu = predict_case_3d(fn_cuda, img, patch=PATCH, stride_xy=5, stride_z=3,
                               device="cuda")
    assert torch.equal(pred_gpu.cpu(), pred_cpu)
