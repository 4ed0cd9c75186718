"""The binary (sigmoid) UC-Seg variant of the 2D-generic trainer (docs/method.md §2, §2.4, §6.4) and
colour image folders: loss terms against an independent computation, the per-channel σ
pseudo-label rule on a hand case, per-image validation against medpy, RGB batches keep their 3
colour channels, and a 3-iteration CLI run on an RGB folder with validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ucseg_fast.cli import main
from ucseg_fast.config import load_config
from ucseg_fast.data.factory import build_train_stream
from ucseg_fast.eval.inference import binary_decision_logits, evaluate_images
from ucseg_fast.losses import au_loss, dice_loss, diff_loss
from ucseg_fast.models import build_ucseg_2d
from ucseg_fast.pseudo_labels import fusion_pseudo_label
from ucseg_fast.train.objective import UCSegObjective
from ucseg_fast.train.schedules import ScheduleTensors


def _setup(**kw):
    torch.manual_seed(0)
    model = build_ucseg_2d(num_classes=2, img_size=(32, 32)).train()
    obj = UCSegObjective(2, queue_size=16, supervision="sigmoid", **kw)
    sched = ScheduleTensors("cpu", T=100)
    sched.update(10)
    x = torch.rand(4, 3, 32, 32)
    y = (torch.rand(2, 32, 32) > 0.6).long()
    return model, obj, sched, x, y


@pytest.mark.parametrize("nms,phase2", [(False, False), (True, True)])
def test_binary_objective_finite_with_gradients(nms, phase2):
    model, obj, sched, x, y = _setup(nms=nms)
    L, terms = obj(model, x, y, sched, phase2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(L)
    L.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert ("mix1" in terms) == phase2
    for k in ("sup1", "sup2", "pseudo", "unsup1", "unsup2", "ic", "ife1", "ife2", "L"):
        assert torch.isfinite(terms[k])


def test_binary_terms_match_an_independent_computation():
    """eval() makes the forward deterministic, so the terms can be recomputed from the outputs:
    BCE on the one-hot, σ Dice, AU on the same logits, σ diff, Y_u = [σ(P_c) > 0.5]."""
    model, obj, sched, x, y = _setup(nms=False, ccp=False)
    model.eval()
    L, t = obj(model, x, y, sched, False)
    with torch.no_grad():
        out = model(x)
    y_oh = torch.stack([y == 0, y == 1], 1).float()
    for k, z in ((1, out.z1), (2, out.z2)):
        zl = z[:2]
        assert torch.allclose(t[f"ce{k}_l"], F.binary_cross_entropy_with_logits(zl, y_oh), atol=1e-6)
        assert torch.allclose(t[f"dice{k}_l"], dice_loss(torch.sigmoid(zl), y_oh), atol=1e-6)
        assert torch.allclose(t[f"au{k}"], au_loss(zl, y, sched.lam), atol=1e-6)
    p1, p2 = torch.sigmoid(out.z1), torch.sigmoid(out.z2)
    assert torch.allclose(t["diff1"], diff_loss(p1, p2), atol=1e-6)
    Y_u = (torch.sigmoid(out.P[2:]) > 0.5).float()  # per channel, no CC
    for k, z in ((1, out.z1), (2, out.z2)):
        ce_u = F.binary_cross_entropy_with_logits(z[2:], Y_u)
        dice_u = dice_loss(torch.sigmoid(z[2:]), Y_u)
        assert torch.allclose(t[f"ce{k}_u"], ce_u, atol=1e-6)
        assert torch.allclose(t[f"dice{k}_u"], dice_u, atol=1e-6)
    # and the softmax variant really differs (the flag is live)
    obj_sm = UCSegObjective(2, queue_size=16, nms=False, ccp=False)
    _, t_sm = obj_sm(model, x, y, sched, False)
    assert not torch.allclose(t_sm["ce1_l"], t["ce1_l"])


def test_sigmoid_pseudo_label_rule_hand_case():
    # pixel: (P_bg, P_fg) -> Y = ([σ(P_bg) > .5], [σ(P_fg) > .5]) per channel, independent
    P = torch.tensor([[[[2.0, -1.0, 1e-8, 0.3]], [[3.0, 0.5, -2.0, 1e-8]]]])  # [1, 2, 1, 4]
    want = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]]])
    # 1e-8: fp32 σ rounds to exactly 0.5, so not > 0.5 (bg of pixel 2, fg of pixel 3)
    assert torch.equal(fusion_pseudo_label(P, nms=False, binary=True), want)
    obj = UCSegObjective(2, nms=False, supervision="sigmoid", ccp=False)

    class Out:
        pass
    o = Out()
    o.P = torch.cat([torch.zeros_like(P), P])
    o.z1 = o.P
    Y, Y_map, mask = obj._pseudo_targets(o, 1, torch.tensor(0.9), None)
    assert mask is None and Y_map is None and torch.equal(Y, want)
    # IFE masks of the 2D-generic trainer: σ(z) itself (CCP resizes, then > 0.5)
    assert torch.equal(obj._soft_masks(P, None), torch.sigmoid(P))


def test_binary_gates_hand_case():
    z = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[2.0, -2.0, 2.0, -2.0]]]])  # fg on pixels 0, 2
    y_oh = torch.tensor([[[[0.0, 1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0, 0.0]]]])  # fg on pixel 0
    from ucseg_fast.losses import queue_gate
    from ucseg_fast.ops import reference
    # hard gate ([σ(z_1) > 0.5] against the class map), as the step computes it
    _, stats = reference.prediction_stats(z, z, None, y_oh.argmax(1), binary=True)
    assert torch.allclose(stats[2], torch.tensor(2 * 1 / (2 + 1 + 1e-3)))
    soft = queue_gate(torch.sigmoid(z), y_oh, binary=True)
    s = torch.sigmoid(torch.tensor([2.0, -2.0, 2.0, -2.0]))
    assert torch.allclose(soft, 2 * s[0] / (s.sum() + 1 + 1e-3))


def test_sigmoid_needs_two_classes_and_fusion():
    with pytest.raises(ValueError, match="num_classes = 4"):
        UCSegObjective(4, supervision="sigmoid")
    with pytest.raises(ValueError, match="entropy"):
        UCSegObjective(2, supervision="sigmoid", pseudo_mode="entropy")
    with pytest.raises(ValueError, match="'softmax' or 'sigmoid'"):
        UCSegObjective(2, supervision="tanh")


def test_binary_decision_logits_is_the_sigmoid_rule():
    z = torch.randn(3, 2, 5, 7)
    z[0, 1, 0, 0] = 1e-8  # σ rounds to 0.5: background
    lab = torch.softmax(binary_decision_logits(z), 1).argmax(1)
    assert torch.equal(lab, (torch.sigmoid(z[:, 1]) > 0.5).long())


def _medpy_dc(a, b):
    from medpy.metric.binary import dc
    return dc(a, b)


@pytest.mark.parametrize("binary", [True, False])
def test_evaluate_images_matches_medpy(binary):
    rng = np.random.default_rng(0)
    C = 2 if binary else 3
    items = []
    for i, (h, w) in enumerate([(20, 30), (40, 40), (33, 17)]):
        items.append((f"im{i}", rng.random((3, h, w), dtype=np.float32), rng.integers(0, C, (h, w))))
    size = (16, 16)
    lg = torch.Generator().manual_seed(1)
    logits = torch.randn(len(items), C, *size, generator=lg)
    logits[2] = -5.0  # empty prediction on the last image: its Dice is 0
    if binary:
        logits[2, 0] = 5.0
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        return logits[sum(calls) - x.shape[0]: sum(calls)]

    res = evaluate_images(predict, items, C, img_size=size, batch_size=2, device="cpu", binary=binary)
    assert calls == [2, 1]
    from ucseg_fast.data.ssl4mis import resize_nearest
    for i, (_, _, lab) in enumerate(items):
        g = resize_nearest(lab, size)
        if binary:
            p = (torch.sigmoid(logits[i, 1]) > 0.5).numpy()
            want = _medpy_dc(p, g == 1)
        else:
            p = logits[i].softmax(0).argmax(0).numpy()
            want = np.mean([_medpy_dc(p == c, g == c) for c in range(1, C)])
        assert res.dice_per_image[i] == pytest.approx(want, abs=1e-12)
    assert res.dice_per_image[2] == 0.0
    assert res.dice == pytest.approx(np.mean(res.dice_per_image))
    # "original": prediction resized back to each label's size
    res_o = evaluate_images(lambda x: logits[:x.shape[0]], items, C, img_size=size, batch_size=3, device="cpu", binary=binary,
                            resolution="original")
    lab0 = items[0][2]
    p0 = (torch.sigmoid(logits[0, 1]) > 0.5).long() if binary else logits[0].softmax(0).argmax(0)
    p0 = resize_nearest(p0.numpy(), lab0.shape)
    want0 = _medpy_dc(p0 == 1, lab0 == 1) if binary else \
        np.mean([_medpy_dc(p0 == c, lab0 == c) for c in range(1, C)])
    assert res_o.dice_per_image[0] == pytest.approx(want0, abs=1e-12)


def _rgb_folder(root, n_lab=4, n_unl=4, n_val=2, hw=(40, 48), ext="png"):
    rng = np.random.default_rng(0)
    for split, n in (("labeled", n_lab), ("unlabeled", n_unl), ("val", n_val)):
        (root / split / "image").mkdir(parents=True)
        (root / split / "mask").mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            img[..., 0] = 200  # distinct channels: a repeated gray channel would show
            img[..., 2] = 10
            m = np.zeros(hw, np.uint8)
            m[5 + i: 20 + i, 8:30] = 255
            Image.fromarray(img, "RGB").save(root / split / "image" / f"c{i}.{ext}")
            Image.fromarray(m).save(root / split / "mask" / f"c{i}.png")
    return root


def test_rgb_folder_stream_keeps_colour(tmp_path):
    root = _rgb_folder(tmp_path / "rgb")
    cfg = load_config("binary_2d", [f"--data.root='{root}'", "--data.img_size=[32,32]",
                                                 "--model.patch_size=16", "--data.labeled_bs=2",
                                                 "--data.unlabeled_bs=2", "--data.augment=false"])
    s = build_train_stream(cfg.data, device="cpu", seed=0, channels=3)
    b = s.next()
    assert b.x_l.shape == (2, 3, 32, 32) and b.x_u.shape == (2, 3, 32, 32)
    # lossless PNG, no augmentation: R = 200/255 and B = 10/255 exactly, G random
    assert torch.equal(b.x_l[:, 0], torch.full_like(b.x_l[:, 0], 200 / 255))
    assert torch.equal(b.x_u[:, 2], torch.full_like(b.x_u[:, 2], 10 / 255))
    assert b.x_l[:, 1].std() > 0.1
    assert set(b.y_l.unique().tolist()) <= {0, 1}


@pytest.mark.dali
def test_rgb_folder_dali_stream_keeps_colour(tmp_path):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    root = _rgb_folder(tmp_path / "rgb")
    cfg = load_config("binary_2d", [f"--data.root='{root}'", "--data.img_size=[32,32]",
                                                 "--model.patch_size=16", "--data.labeled_bs=2",
                                                 "--data.unlabeled_bs=2", "--data.augment=false",
                                                 "--data.backend='dali'"])
    s = build_train_stream(cfg.data, device="cpu", seed=0, channels=3)
    b = s.next()
    assert b.x_l.shape == (2, 3, 32, 32) and b.x_u.shape == (2, 3, 32, 32)
    assert torch.allclose(b.x_l[:, 0], torch.full_like(b.x_l[:, 0], 200 / 255), atol=1e-6)
    assert torch.allclose(b.x_u[:, 2], torch.full_like(b.x_u[:, 2], 10 / 255), atol=1e-6)
    assert b.x_l[:, 1].std() > 0.1


def test_rgb_folder_trains_from_cli_with_validation(tmp_path):
    root = _rgb_folder(tmp_path / "rgb", ext="jpg")  # JPEG images + PNG masks, as polyp sets
    out = tmp_path / "run"
    assert main(["train", "--config", "binary_2d", f"--data.root='{root}'",
                 f"--train.out_dir='{out}'", "--data.img_size=[32,32]", "--model.patch_size=16",
                 "--data.labeled_bs=2", "--data.unlabeled_bs=2", "--train.max_iterations=3",
                 "--train.val_every=3", "--train.log_every=1", "--train.progress=false",
                 "--train.amp='none'", "--train.channels_last=false", "--loss.queue_size=16",
                 "--data.labeled_patients=3"]) == 0
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2, 3]
    vals = [r for r in recs if "val_dice" in r]
    assert [r["iteration"] for r in vals] == [0, 3]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in vals)
    assert all(np.isfinite(r["L"]) for r in recs if "L" in r)
