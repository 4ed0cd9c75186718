"""Slice-wise inference (scipy zoom rule), the evaluation protocol, and report outputs."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from scipy.ndimage import zoom

from ucseg_fast.eval import (evaluate_volumes, format_table, predict_volume, save_nifti,
                             save_overlay_figure, segmentation_metrics, write_csv, write_json,
                             zoom_nearest, zoom_order0_indices)

# (in, out) sizes: odd and even, up and down; 256 → 215/216 hit scipy's last-index overflow
# (the last row/column becomes cval = 0).
ZOOM_CASES = [((7, 13), (256, 256)), ((155, 217), (256, 256)), ((256, 256), (215, 216)),
              ((256, 256), (37, 155)), ((1, 5), (256, 3)), ((256, 184), (288, 256)),
              ((33, 2), (1, 9))]


@pytest.mark.parametrize("in_hw,out_hw", ZOOM_CASES)
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_zoom_nearest_equals_scipy_order0(in_hw, out_hw, dtype):
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    x = (rng.integers(1, 1000, size=in_hw) if dtype == np.int64
         else rng.random(in_hw) + 0.5).astype(dtype)
    ref = zoom(x, (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1]), order=0)
    assert ref.shape == out_hw
    ours = zoom_nearest(torch.from_numpy(x)[None, None], out_hw)[0, 0].numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == ref.dtype


def test_zoom_overflow_quirk_is_reproduced():
    index, valid = zoom_order0_indices(256, 216)
    assert not valid[-1] and valid[:-1].all()     # scipy writes cval at the last column
    assert zoom(np.ones((4, 256)), (1, 216 / 256), order=0)[:, -1].tolist() == [0.0] * 4
    index, valid = zoom_order0_indices(256, 224)
    assert valid.all() and index[-1] == 255


def test_zoom_indices_exhaustive_against_scipy():
    """The index rule itself, for every size 1..300 to and from 256 (1-D lines)."""
    for n in range(1, 301):
        for a, b in ((n, 256), (256, n)):
            line = np.arange(1, a + 1, dtype=np.int64)[:, None]
            ref = zoom(line, (b / a, 1), order=0)[:, 0]
            index, valid = zoom_order0_indices(a, b)
            np.testing.assert_array_equal(np.where(valid, index + 1, 0), ref, err_msg=f"{a}->{b}")


def scipy_reference_volume(predict_np, volume, size=256):
    """The reference's test_single_volume loop, with scipy zoom, batch 1."""
    out = np.zeros_like(volume, dtype=np.int64)
    for z in range(volume.shape[0]):
        h, w = volume[z].shape
        s = zoom(volume[z], (size / h, size / w), order=0)
        logits = predict_np(s)
        p = np.argmax(logits, axis=0)
        out[z] = zoom(p, (h / size, w / size), order=0)
    return out


def oracle_logits_np(slice_hw, num_classes=4):
    """Class k where the image value is k/4: one-hot logits of the decoded map."""
    lab = np.rint(slice_hw * num_classes).astype(np.int64).clip(0, num_classes - 1)
    return np.eye(num_classes, dtype=np.float32)[lab].transpose(2, 0, 1) * 5.0


def oracle_predict_fn(calls, num_classes=4):
    def fn(x):
        calls.append(tuple(x.shape))
        assert x.dtype == torch.float32 and torch.equal(x[:, 0], x[:, 2])
        lab = torch.round(x[:, 0] * num_classes).long().clamp(0, num_classes - 1)
        return torch.nn.functional.one_hot(lab, num_classes).permute(0, 3, 1, 2).float() * 5.0
    return fn


@pytest.mark.parametrize("hw", [(37, 45), (256, 216), (300, 190)])
def test_predict_volume_matches_reference_loop(hw):
    rng = np.random.default_rng(hw[0])
    label = rng.integers(0, 4, size=(5, *hw))
    volume = (label / 4.0).astype(np.float32)
    calls: list = []
    pred = predict_volume(oracle_predict_fn(calls), volume, img_size=(256, 256), batch_size=2,
                          device="cpu")
    assert pred.dtype == torch.int64 and tuple(pred.shape) == (5, *hw)
    assert calls == [(2, 3, 256, 256), (2, 3, 256, 256), (1, 3, 256, 256)]
    ref = scipy_reference_volume(oracle_logits_np, volume)
    np.testing.assert_array_equal(pred.numpy(), ref)


def test_predict_volume_oracle_at_256_reproduces_map():
    """logits = one-hot of a known 256² map per slice → that map, zoomed back (order 0)."""
    rng = np.random.default_rng(11)
    maps_256 = rng.integers(0, 3, size=(3, 256, 256))
    idx = iter(range(3))

    def fn(x):
        k = next(idx)
        lab = torch.from_numpy(maps_256[k:k + 1])
        return torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float()

    vol = np.zeros((3, 64, 80), np.float32)
    pred = predict_volume(fn, vol, batch_size=1, device="cpu").numpy()
    for k in range(3):
        np.testing.assert_array_equal(pred[k], zoom(maps_256[k], (64 / 256, 80 / 256), order=0))


def test_predict_volume_rejects_bad_predict_fn():
    vol = np.zeros((2, 10, 10), np.float32)
    with pytest.raises(ValueError, match="expected"):
        predict_volume(lambda x: x[:, :1, :8], vol, device="cpu")
    with pytest.raises(TypeError, match="tuple"):
        predict_volume(lambda x: (x, x), vol, device="cpu")


def synthetic_volumes():
    """Two tiny 4-class volumes whose up-and-down zoom is the identity (no overflow sizes)."""
    out = []
    for k, (d, h, w) in enumerate([(3, 20, 24), (2, 30, 18)]):
        yy, xx = np.mgrid[:h, :w]
        lab = np.zeros((d, h, w), np.int64)
        for z in range(d):
            r = np.hypot(yy - h / 2, xx - w / 2)
            lab[z][r < 8 - z] = 2
            lab[z][r < 5 - z] = 3
            lab[z][(xx < 4) & (yy > 3 + k)] = 1
        out.append((f"vol{k}", (lab / 4.0).astype(np.float32), lab))
    return out


def test_evaluate_volumes_perfect_predictor_and_reports(tmp_path):
    vols = synthetic_volumes()
    for _, img, lab in vols:
        h, w = lab.shape[1:]
        for n in (h, w):
            i_up, v_up = zoom_order0_indices(n, 256)
            i_dn, v_dn = zoom_order0_indices(256, n)
            assert v_up.all() and v_dn.all() and (i_up[i_dn] == np.arange(n)).all()
    fn = oracle_predict_fn([])
    res = evaluate_volumes(fn, vols, 4, img_size=(256, 256), batch_size=4, device="cpu")
    assert res.names == ("vol0", "vol1") and res.summary.n_volumes == 2
    np.testing.assert_array_equal(res.summary.dice, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(res.summary.hd95, [0.0, 0.0, 0.0])
    assert res.mean() == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}

    # Reports of an EvaluationResult.
    table = format_table(res)
    assert all(n in table for n in ("RV", "Myo", "LV", "Dice %", "mean"))
    d = json.loads(write_json(tmp_path / "r.json", res).read_text())
    assert d["summary"]["mean"]["dice"] == 1.0 and d["class_names"] == ["RV", "Myo", "LV"]
    rows = list(csv.DictReader(write_csv(tmp_path / "r.csv", res).open()))
    assert len(rows) == 2 * 4 + 4 and rows[0]["volume"] == "vol0" and rows[0]["name"] == "RV"
    assert float(rows[0]["dice"]) == 1.0 and rows[-1]["class"] == "mean"


def test_evaluate_volumes_validation_protocol_matches_reference():
    """dice_only: per class medpy dc (0 if the predicted class is empty), mean over volumes
    then classes — the reference's validation, computed here with scipy zoom and medpy."""
    dc = pytest.importorskip("medpy.metric.binary").dc
    vols = synthetic_volumes()
    fn = oracle_predict_fn([])

    def worse(x):
        return torch.roll(fn(x), shifts=7, dims=3)

    val = evaluate_volumes(worse, vols, 4, img_size=(256, 256), batch_size=2, device="cpu",
                           dice_only=True)
    assert val.summary.hd95 is None and set(val.mean()) == {"dice", "jaccard"}
    per_vol = []
    for _, img, lab in vols:
        p = scipy_reference_volume(lambda s: np.roll(oracle_logits_np(s), 7, axis=2), img)
        per_vol.append([dc(p == c, lab == c) if (p == c).sum() > 0 else 0 for c in (1, 2, 3)])
    expected = np.mean(np.mean(per_vol, axis=0))
    assert abs(val.mean()["dice"] - expected) < 1e-12 and 0.2 < expected < 0.99
    assert "HD95" not in format_table(val) and "Myo" in format_table(val)


def test_evaluate_on_acdc_volume(acdc_set, tmp_path):
    """A validation volume (256×216: hits scipy's overflow column) through the oracle: the
    synthetic set's first, and the real patient019_frame01 in the real-data tier."""
    name = "patient019_frame01" if acdc_set.real else \
        (acdc_set.root / "val.list").read_text().split()[0]
    with h5py.File(acdc_set.root / "data" / f"{name}.h5", "r") as f:
        lab = f["label"][:].astype(np.int64)
    assert lab.shape[1:] == (256, 216) and not zoom_order0_indices(256, 216)[1].all()
    img = (lab / 4.0).astype(np.float32)[:3]
    lab = lab[:3]
    fn = oracle_predict_fn([])
    res = evaluate_volumes(fn, [("p19", img, lab, (10.0, 1.5, 1.5))], 4, batch_size=3,
                           device="cpu", mode="strict")
    ref_pred = scipy_reference_volume(oracle_logits_np, img)
    ref = segmentation_metrics(ref_pred, lab, 4, spacing=(10.0, 1.5, 1.5), mode="strict")
    for m in ("dice", "jaccard", "hd95", "asd"):
        np.testing.assert_array_equal(getattr(res.per_volume[0], m), getattr(ref, m))
    assert res.summary.units == "spacing"


def test_report_outputs_single_result(tmp_path):
    lab = np.zeros((4, 16, 16), np.int64)
    lab[1:3, 4:12, 4:12] = 3
    lab[1:3, 6:10, 6:10] = 2
    pred = np.roll(lab, 1, axis=2)
    pred[0, 0, 0] = 1                               # class 1: prediction only (GT empty)
    r = segmentation_metrics(pred, lab, 4, mode="strict")
    table = format_table(r)
    lines = table.splitlines()
    assert "mode=strict" in lines[0] and "HD95 (vox)" in lines[1]
    assert lines[3].split()[0] == "RV" and lines[3].split()[-1] == "0/1/0"
    assert f"{100 * r.dice[2]:.2f}" in lines[5]
    d = json.loads(write_json(tmp_path / "one.json", r).read_text())
    assert d["per_class"]["1"]["hd95"] is None and d["n_empty"]["gt_empty"] == [1, 0, 0]
    rows = list(csv.reader(write_csv(tmp_path / "one.csv", r).open()))
    assert rows[0] == ["volume", "class", "name", "dice", "jaccard", "hd95", "asd"]
    assert float(rows[3][3]) == r.dice[2] and rows[1][5] == "nan"

    png = tmp_path / "fig" / "overlay.png"
    picks = save_overlay_figure(png, lab / 3.0, lab, pred, n_slices=4)
    assert picks == [0, 1, 2]                       # only slices with foreground
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_save_nifti_roundtrip(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 4
    p = save_nifti(tmp_path / "x.nii.gz", torch.from_numpy(vol), spacing=(10.0, 1.5, 1.25))
    img = nib.load(str(p))
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), vol)
    assert img.header.get_zooms() == (1.25, 1.5, 10.0)


@pytest.mark.gpu
def test_cuda_paths_equal_cpu():
    """Zoom gathers, argmax and the confusion counts on CUDA give the CPU/scipy results."""
    rng = np.random.default_rng(5)
    label = rng.integers(0, 4, size=(5, 256, 216))
    volume = (label / 4.0).astype(np.float32)
    pred_gpu = predict_volume(oracle_predict_fn([]), torch.from_numpy(volume).cuda(),
                              batch_size=4)
    assert pred_gpu.device.type == "cuda"
    np.testing.assert_array_equal(pred_gpu.cpu().numpy(),
                                  scipy_reference_volume(oracle_logits_np, volume))
    shifted = torch.roll(pred_gpu, 3, dims=2)
    r_gpu = segmentation_metrics(shifted, torch.from_numpy(label).cuda(), 4, mode="strict")
    r_cpu = segmentation_metrics(shifted.cpu().numpy(), label, 4, mode="strict")
    for m in ("dice", "jaccard", "hd95", "asd"):
        np.testing.assert_array_equal(getattr(r_gpu, m), getattr(r_cpu, m))
