"""Metrics against medpy (the reference's implementation) and the reference's conventions."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, gaussian_filter

from ucseg_fast.eval import metrics as M
from ucseg_fast.eval.metrics import mean_over_volumes, segmentation_metrics

medpy_binary = pytest.importorskip("medpy.metric.binary")
dc, jc, hd95, asd = medpy_binary.dc, medpy_binary.jc, medpy_binary.hd95, medpy_binary.asd

TOL = 1e-9


def blobs(shape, seed, levels=(-0.1, 0.05, 0.15), noise=0.3):
    """A smooth random 4-class map and a perturbed copy (objects touch the array border)."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), 2.0)
    gt = np.digitize(field, levels).astype(np.int64)
    pred = np.digitize(gaussian_filter(field + noise * rng.standard_normal(shape), 1.0), levels)
    return pred.astype(np.int64), gt


def reference_percase(pred, gt, spacing=None):
    """medpy per binary mask, as the reference's calculate_metric_percase (pred present)."""
    return dc(pred, gt), jc(pred, gt), hd95(pred, gt, spacing), asd(pred, gt, spacing)


def assert_matches_medpy(pred, gt, num_classes, spacing=None):
    r = segmentation_metrics(pred, gt, num_classes, spacing=spacing)
    assert r.classes == tuple(range(1, num_classes))
    checked = 0
    for i, c in enumerate(r.classes):
        p, g = pred == c, gt == c
        if not p.any() or not g.any():
            continue
        ref = reference_percase(p, g, spacing)
        ours = (r.dice[i], r.jaccard[i], r.hd95[i], r.asd[i])
        np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL, err_msg=f"class {c}")
        checked += 1
    assert checked > 0
    return r


@pytest.mark.parametrize("shape,spacing", [
    ((37, 45), None), ((37, 45), (1.5, 0.7)),
    ((7, 29, 33), None), ((7, 29, 33), (10.0, 1.5, 1.5)), ((6, 21, 19), (3.3, 0.7, 1.1)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_match_medpy(shape, spacing, seed):
    pred, gt = blobs(shape, seed)
    r = assert_matches_medpy(pred, gt, 4, spacing)
    assert r.dice.dtype == np.float64 and r.hd95.dtype == np.float64
    assert (r.hd95 > 0).all() and (r.dice < 1).all()  # a real, imperfect case


def test_scalar_spacing_and_2class_match_medpy():
    pred, gt = blobs((25, 31), 3, levels=(0.0,))
    r = segmentation_metrics(pred, gt, 2, spacing=0.8)
    assert r.spacing == (0.8, 0.8)
    np.testing.assert_allclose((r.dice[0], r.jaccard[0], r.hd95[0], r.asd[0]),
                               reference_percase(pred == 1, gt == 1, 0.8), rtol=0, atol=TOL)


def test_hand_computed_2d_case():
    # GT: 3x3 square; prediction: the same square shifted one column right.
    gt = np.zeros((7, 8), np.int64)
    gt[2:5, 2:5] = 1
    pred = np.roll(gt, 1, axis=1)
    r = segmentation_metrics(pred, gt, 2)
    assert r.dice[0] == 2 * 6 / 18 and r.jaccard[0] == 6 / 12
    # Surfaces: the 8 border voxels of each square (its centre is interior). pred→gt: 4 of
    # pred's surface voxels lie on gt's surface (0); its right column (3 voxels) and the middle
    # of its left column (gt's interior centre) are 1 away. gt→pred is the mirror image.
    d_pg, d_gp = M._surface_distances(pred == 1, gt == 1, None)
    assert sorted(d_pg.tolist()) == [0.0] * 4 + [1.0] * 4
    assert r.asd[0] == 0.5
    assert r.hd95[0] == np.percentile(np.hstack((d_pg, d_gp)), 95) == 1.0


def test_spacing_scales_distances():
    gt = np.zeros((5, 9, 9), np.int64)
    gt[1:4, 2:7, 2:7] = 1
    pred = np.roll(gt, 2, axis=2)  # shift 2 voxels along the last axis
    r1 = segmentation_metrics(pred, gt, 2)
    r2 = segmentation_metrics(pred, gt, 2, spacing=(10.0, 1.5, 2.0))
    assert r1.hd95[0] == 2.0 and r2.hd95[0] == 4.0  # pure shift along an axis of spacing 2
    assert r2.units == "spacing" and r1.units == "voxel"


@pytest.mark.parametrize("spacing", [None, (10.0, 1.5, 1.5)])
def test_acdc_masks_match_medpy(acdc_set, spacing):
    """Cardiac masks (the synthetic set's first validation volume; the real patient087_frame01
    in the real-data tier)."""
    name = "patient087_frame01" if acdc_set.real else \
        (acdc_set.root / "val.list").read_text().split()[0]
    with h5py.File(acdc_set.root / "data" / f"{name}.h5", "r") as f:
        gt = f["label"][:].astype(np.int64)
    assert set(np.unique(gt)) == {0, 1, 2, 3}
    # An eroded-and-shifted GT: every class is present in both but differs.
    pred = np.zeros_like(gt)
    for c in (1, 2, 3):
        m = binary_erosion(gt == c, iterations=1)
        pred[np.roll(m, (0, 2, -1), axis=(0, 1, 2))] = c
    assert_matches_medpy(pred, gt, 4, spacing)


def test_torch_input_equals_numpy():
    pred, gt = blobs((5, 24, 26), 4)
    ref = segmentation_metrics(pred, gt, 4, spacing=(10, 1.5, 1.5))
    for p, g in [(torch.from_numpy(pred), torch.from_numpy(gt)),
                 (torch.from_numpy(pred).to(torch.uint8), gt.astype(np.float32)),
                 (torch.from_numpy(pred).float(), torch.from_numpy(gt))]:
        r = segmentation_metrics(p, g, 4, spacing=(10, 1.5, 1.5))
        for m in ("dice", "jaccard", "hd95", "asd"):
            np.testing.assert_array_equal(getattr(r, m), getattr(ref, m))


def test_reference_convention_absent_predicted_class_is_zero():
    """The reference (`calculate_metric_percase`): class absent from the prediction → 0,0,0,0;
    otherwise medpy. Our medpy mode reproduces the whole per-class table."""
    pred, gt = blobs((6, 22, 25), 5)
    pred[pred == 2] = 0  # class 2 missing from the prediction, present in the GT

    def reference(p, g):
        if p.sum() > 0:
            return dc(p, g), jc(p, g), hd95(p, g), asd(p, g)
        return 0, 0, 0, 0

    r = segmentation_metrics(pred, gt, 4)
    for i, c in enumerate(r.classes):
        np.testing.assert_allclose((r.dice[i], r.jaccard[i], r.hd95[i], r.asd[i]),
                                   reference(pred == c, gt == c), rtol=0, atol=TOL)
    assert r.for_class(2) == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}
    assert r.n_empty["pred_empty"].tolist() == [0, 1, 0]
    # The 3D reference gives 100 instead of 0 to the distances.
    r100 = segmentation_metrics(pred, gt, 4, empty_pred_distance=100.0)
    assert r100.hd95[1] == 100.0 and r100.asd[1] == 100.0 and r100.dice[1] == 0.0


def test_absent_class_conventions_medpy_and_strict():
    gt = np.zeros((10, 12), np.int64)
    gt[2:6, 2:6] = 1                          # class 1: GT only (prediction empty)
    pred = np.zeros_like(gt)
    pred[7:9, 7:10] = 2                       # class 2: prediction only (GT empty)
    gt[0:2, 9:12] = 3; pred[0:2, 8:12] = 3    # class 3: both present
    # class 4: absent from both
    with pytest.raises(RuntimeError):          # what the reference would hit for class 2
        hd95(pred == 2, gt == 2)

    med = segmentation_metrics(pred, gt, 5)
    assert med.dice.tolist()[:3] == [0.0, 0.0, 2 * 6 / 14] and med.dice[3] == 0.0
    assert med.jaccard.tolist() == [0.0, 0.0, 6 / 8, 0.0]
    assert med.hd95[0] == 0.0 and med.asd[0] == 0.0          # pred empty → 0 (reference)
    assert math.isnan(med.hd95[1]) and math.isnan(med.asd[1])  # GT empty → NaN (medpy raises)
    assert med.hd95[3] == 0.0                                  # both empty: pred empty → 0
    assert {k: v.tolist() for k, v in med.n_empty.items()} == {
        "pred_empty": [1, 0, 0, 0], "gt_empty": [0, 1, 0, 0], "both_empty": [0, 0, 0, 1]}
    # NaN left out of the class mean: hd95 mean over the 3 defined classes.
    assert med.mean()["hd95"] == pytest.approx((0.0 + med.hd95[2] + 0.0) / 3, abs=0)

    st = segmentation_metrics(pred, gt, 5, mode="strict", spacing=(2.0, 1.0))
    assert st.dice[0] == 0.0 and st.dice[1] == 0.0 and math.isnan(st.dice[3])
    assert math.isnan(st.jaccard[3])
    assert np.isnan(st.hd95[[0, 1, 3]]).all() and np.isnan(st.asd[[0, 1, 3]]).all()
    ref = reference_percase(pred == 3, gt == 3, (2.0, 1.0))
    np.testing.assert_allclose((st.dice[2], st.jaccard[2], st.hd95[2], st.asd[2]), ref,
                               rtol=0, atol=TOL)
    assert {k: v.tolist() for k, v in st.n_empty.items()} == {
        "pred_empty": [1, 0, 0, 0], "gt_empty": [0, 1, 0, 0], "both_empty": [0, 0, 0, 1]}
    assert st.mean()["dice"] == pytest.approx((0 + 0 + st.dice[2]) / 3, abs=0)


def test_classes_argument_and_as_dict_is_strict_json():
    pred, gt = blobs((20, 22), 6)
    pred[pred == 3] = 0
    r = segmentation_metrics(pred, gt, 4, classes=[3, 1], mode="strict")
    full = segmentation_metrics(pred, gt, 4, mode="strict")
    assert r.classes == (3, 1)
    assert r.dice[1] == full.dice[0] and r.hd95[1] == full.hd95[0]
    d = json.loads(json.dumps(r.as_dict(), allow_nan=False))
    assert d["per_class"]["3"]["hd95"] is None and d["per_class"]["1"]["dice"] == r.dice[1]
    assert d["classes"] == [3, 1] and d["n_empty"]["pred_empty"] == [1, 0]


def test_mean_over_volumes_and_dice_only():
    vols = [blobs((4, 16, 18), s) for s in (7, 8, 9)]
    rs = [segmentation_metrics(p, g, 4) for p, g in vols]
    m = mean_over_volumes(rs)
    np.testing.assert_allclose(m.dice, np.mean([r.dice for r in rs], axis=0), rtol=0, atol=0)
    assert m.n_volumes == 3
    d = segmentation_metrics(*vols[0], 4, distances=False)
    assert d.hd95 is None and d.asd is None and set(d.mean()) == {"dice", "jaccard"}
    np.testing.assert_array_equal(d.dice, rs[0].dice)


def test_input_errors_name_the_problem():
    a = np.zeros((4, 5), np.int64)
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(a, np.zeros((4, 6), np.int64), 2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        segmentation_metrics(a + 2, a, 2)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, a, 2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="non-integer"):
        segmentation_metrics(a + 0.5, a, 2)
    with pytest.raises(ValueError, match="mode"):
        segmentation_metrics(a, a, 2, mode="nnunet")  # type: ignore[arg-type]


def test_surface_distance_hook_is_looked_up_at_call_time(monkeypatch):
    pred, gt = blobs((12, 14), 10)
    calls = []

    def fake(p, g, spacing):
        calls.append(spacing)
        return np.array([1.0, 3.0]), np.array([5.0])

    monkeypatch.setattr(M, "_surface_distances", fake)
    r = segmentation_metrics(pred, gt, 4, spacing=(2.0, 1.0))
    assert calls and calls[0] == (2.0, 1.0)
    assert r.asd[0] == 2.0 and r.hd95[0] == np.percentile([1.0, 3.0, 5.0], 95)
