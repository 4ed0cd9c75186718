"""Golden parity of one whole training objective (the `obj1.*` / `obj2.*` golden keys).

The subnets are replaced by fixed modules returning the golden logits and features (as the
reference was driven); everything else — uncertainty, UPG, pseudo-labels with largest-CC,
supervised / pseudo / unsupervised / CCP terms, the queue gate and update, phase-2 copy-paste
and the mixed forward, the backward — is the project's own `UCSegObjective` + `UCSeg`, run in
float64 with the reference's quirks switched on (shared queue pointer, soft gate).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from golden import disc_map, golden, one_hot
from ucseg_fast.models import UCSeg
from ucseg_fast.models.upg import UPG
from ucseg_fast.pseudo_labels import fusion_pseudo_label_map, acdc_masks
from ucseg_fast.train.objective import UCSegObjective
from ucseg_fast.train.schedules import ScheduleTensors

LEVELS = (64, 128, 256)

# tolerance class of every term (f32 where the reference rounds to float32; tests/golden/README.md)
TERM_TOL = {**{k: "f64" for k in (
    "ce1_l", "ce2_l", "ceP_l", "au1", "au2", "auP", "dice1_l", "dice2_l", "diceP_l", "sup1",
    "sup2", "pseudo", "ce1_u", "dice1_u", "ce2_u", "dice2_u", "unsup1", "unsup2",
    "ce1_m", "dice1_m", "ce2_m", "dice2_m", "mix1", "mix2")},
    **{k: "loose" for k in ("diff1", "diff2", "diffmix1", "diffmix2", "gate1", "gate2")},
    **{k: "f32" for k in ("ic", "ife1", "ife2", "icmix", "ife1mix", "ife2mix",
                          "loss_1", "loss_2", "L")}}


class FixedNet(nn.Module):
    """Returns given logits/features: the batch ones on the first call, the mixed ones after."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, x):
        z, feats = self.outputs[min(self.calls, len(self.outputs) - 1)]
        self.calls += 1
        assert x.shape[0] == z.shape[0]
        return z, feats


def _upg(g) -> UPG:
    cfg = g.meta["config"]
    upg = UPG(cfg["num_classes"], tuple(cfg["img_size"]), cfg["patch_size"]).double()
    upg.load_state_dict({k[len("upg.sd."):]: g.tensor(k) for k in g.meta["tensors"]
                         if k.startswith("upg.sd.")})
    for name in g.meta["dropout_replaced_by_identity"]:
        parent, _, leaf = name.rpartition(".")
        setattr(upg.get_submodule(parent), leaf, nn.Identity())
    return upg


def _feats(g, prefix, y=None):
    # subnets return 5 maps; CCP uses the last three (64, 128, 256 channels)
    dummy = [torch.zeros(1), torch.zeros(1)]
    return dummy + [g.input(f"{prefix}_{c}").requires_grad_() for c in LEVELS]


def _run(phase: int):
    g = golden()
    key = f"obj{phase}"
    y = one_hot(disc_map(g.scalar(f"{key}.y_discs")))
    y_cls = y.argmax(1)[:2]
    z1 = g.input(f"{key}.in.z1", y).requires_grad_()
    z2 = g.input(f"{key}.in.z2", y).requires_grad_()
    f1 = _feats(g, "ccp.in.f1")
    f2 = _feats(g, "ccp.in.f2")
    out1, out2 = [(z1, f1)], [(z2, f2)]
    mixed = {}
    if phase == 2:
        z1m = g.input("obj2.in.z1m", y).requires_grad_()
        z2m = g.input("obj2.in.z2m", y).requires_grad_()
        f1m = _feats(g, "obj2.in.f1m")
        f2m = _feats(g, "obj2.in.f2m")
        out1.append((z1m, f1m)); out2.append((z2m, f2m))
        mixed = dict(z1m=z1m, z2m=z2m, f1m=f1m, f2m=f2m)
    model = UCSeg(FixedNet(out1), FixedNet(out2), _upg(g), num_classes=4).train()
    obj = UCSegObjective(4, nms=True, queue_pointer="shared", queue_init="reference",
                         queue_gate="soft", queue_size=1440).double()
    ptr0 = int(g.scalar("ccp.ptr_before"))
    for lvl, c in zip(obj.ccp.levels, LEVELS):
        lvl.load_queues(g.input(f"ccp.in.Q1_{c}"), g.input(f"ccp.in.Q2_{c}"), ptr0)
    q_before = [(lvl.queue1.clone(), lvl.queue2.clone()) for lvl in obj.ccp.levels]
    t = g.scalar(f"{key}.t")
    sched = ScheduleTensors("cpu", dtype=torch.float64, T=50000, clamp_at_T=False)
    sched.update(t)
    kw = {}
    if phase == 2:
        terms = g.scalar("obj2.terms")
        kw = dict(mix_box=torch.tensor([terms["box_row_start"], terms["box_col_start"]]),
                  mix_branch_a=torch.tensor(terms["branch"] == "a"))
    x = g.input(f"{key}.in.x")
    captured = {}

    def keep_first(module, inputs, output):  # must return None: a value would replace the output
        captured.setdefault("A_P", (output[0].detach(), output[1].detach()))

    hook = model.upg.register_forward_hook(keep_first)
    L, tm = obj(model, x, y_cls, sched, phase2=(phase == 2), **kw)
    hook.remove()
    L.backward()
    return dict(g=g, key=key, L=L, terms=tm, z1=z1, z2=z2, f1=f1, f2=f2, obj=obj, model=model,
                q_before=q_before, captured=captured, y=y, **mixed)


@pytest.fixture(scope="module", params=[1, 2], ids=["phase1", "phase2"])
def run(request):
    return _run(request.param)


def test_terms(run):
    g, key, tm = run["g"], run["key"], run["terms"]
    ref = g.scalar(f"{key}.terms")
    checked = 0
    for name, tol in TERM_TOL.items():
        if name not in ref:
            continue
        assert name in tm, f"objective does not report term {name}"
        g._close(f"{key}.terms.{name}", tm[name], ref[name], tol)
        checked += 1
    assert checked == (28 if key == "obj1" else 39)
    g._close(f"{key}.L", run["L"].detach(), ref["L"], "f32")


def test_forward_maps(run):
    g, key = run["g"], run["key"]
    A, P = run["captured"]["A_P"]
    g.check(f"{key}.A", A, "f64")
    g.check(f"{key}.P", P, "f64")
    g.check("obj.Y_u", fusion_pseudo_label_map(P[2:], nms=True), "exact")
    g.check(f"{key}.ife_mask1", acdc_masks(run["z1"].detach(), nms=True), "exact")
    g.check(f"{key}.ife_mask2", acdc_masks(run["z2"].detach(), nms=True), "exact")


def test_gradients(run):
    g, key = run["g"], run["key"]
    g.check(f"{key}.grad.z1", run["z1"].grad, "f64g")
    g.check(f"{key}.grad.z2", run["z2"].grad, "f64g")
    for i, c in enumerate(LEVELS):
        g.check(f"{key}.grad.f1_{c}", run["f1"][2 + i].grad, "f32")
        g.check(f"{key}.grad.f2_{c}", run["f2"][2 + i].grad, "f32")
    if key == "obj2":
        g.check("obj2.grad.z1m", run["z1m"].grad, "f64g")
        g.check("obj2.grad.z2m", run["z2m"].grad, "f64g")
        for i, c in enumerate(LEVELS):
            g.check(f"obj2.grad.f1m_{c}", run["f1m"][2 + i].grad, "f32")
            g.check(f"obj2.grad.f2m_{c}", run["f2m"][2 + i].grad, "f32")
    for name, p in run["model"].upg.named_parameters():
        k = f"{key}.grad.upg.{name}"
        if name.endswith("attn.temperature"):
            assert p.grad is None
        elif name.endswith("attn.w_k.bias"):
            g.check_zero(k, p.grad, f"{key}.grad.upg.cross_attn.attn.w_k.weight")
        else:
            g.check(k, p.grad, "f64g")


def test_bn_running_stats(run):
    g, key = run["g"], run["key"]
    head = run["model"].upg.final_head
    for i in range(1, 7):
        bn = getattr(head, f"conv{i}")[1]
        g.check(f"{key}.bn{i}.running_mean_after", bn.running_mean, "f64")
        g.check(f"{key}.bn{i}.running_var_after", bn.running_var, "f64")
        assert int(bn.num_batches_tracked) == g.scalar(f"{key}.num_batches_tracked_after")


def test_queue_updates(run):
    g, key = run["g"], run["key"]
    for lvl, c, (q1_0, q2_0) in zip(run["obj"].ccp.levels, LEVELS, run["q_before"]):
        for k, q0 in ((1, q1_0), (2, q2_0)):
            pre = f"{key}.L{c}.Q{k}"
            q = lvl.queue(k)
            if not g.scalar(f"{pre}.updated"):
                assert torch.equal(q, q0), f"{pre}: queue changed although the gate was closed"
                continue
            slots = torch.tensor(g.scalar(f"{pre}.slots"))
            assert int(lvl.ptr(k).flatten()[0]) == g.scalar(f"{pre}.ptr_after")
            written = torch.stack([q[ci][:, slots[ci]] for ci in range(4)])
            g.check(f"{pre}.written", written, "f64")
            keep = torch.ones(q.shape[-1], dtype=torch.bool)
            keep[slots.flatten()] = False
            assert torch.equal(q[..., keep], q0[..., keep])
