"""CCP (IC, IFE, queue update) against the reference's numbers: the `ccp.*` golden keys
(tests/golden/README.md). Inputs: features and queues regenerated with `g.input`, predicted/label maps from
`disc_map` of the `ccp.*_discs` parameters; everything in float64 like the golden run."""
from __future__ import annotations

import pytest
import torch
from golden import disc_map, golden, one_hot

from ucseg_fast.ccp import CCP, CCPLevel, adaptive_pool_grid, resize_mask

LEVELS = (64, 128, 256)  # CCP.levels order; the reference's embedding[-3], [-2], [-1]


@pytest.fixture(scope="module")
def run():
    """One float64 pass over item 4: losses, gradients, then the queue update."""
    g = golden()
    maps = {k: disc_map(g.scalar(f"ccp.{k}_discs")) for k in ("pred1", "pred2", "qlabel")}
    ptr0 = int(g.scalar("ccp.ptr_before"))
    ccp = CCP(4, LEVELS, queue_size=1440, temperature=0.3, batch_size=4).double()
    f1 = [g.input(f"ccp.in.f1_{c}").requires_grad_() for c in LEVELS]
    f2 = [g.input(f"ccp.in.f2_{c}").requires_grad_() for c in LEVELS]
    q_before = []
    for lvl, c in zip(ccp.levels, LEVELS):
        q1, q2 = g.input(f"ccp.in.Q1_{c}"), g.input(f"ccp.in.Q2_{c}")
        lvl.load_queues(q1, q2, ptr0)
        q_before.append((q1, q2))
    pred1, pred2 = one_hot(maps["pred1"]), one_hot(maps["pred2"])
    ic, ic_per = ccp.ic(f1, f2)
    ife1, ife1_per = ccp.ife(f1, pred1, 1)
    ife2, ife2_per = ccp.ife(f2, pred2, 2)
    grads = {
        "ic": torch.autograd.grad(ic, f1 + f2, retain_graph=True),
        "ife1": torch.autograd.grad(ife1, f1),
        "ife2": torch.autograd.grad(ife2, f2),
    }
    label = one_hot(maps["qlabel"])
    gate = torch.tensor(True)
    ccp.enqueue([f.detach() for f in f1], label, 1, gate)
    ccp.enqueue([f.detach() for f in f2], label, 2, gate)
    return dict(g=g, maps=maps, ptr0=ptr0, ccp=ccp, f1=f1, f2=f2, pred=(pred1, pred2),
                label=label, q_before=q_before, ic=ic, ife1=ife1, ife2=ife2, ic_per=ic_per,
                ife1_per=ife1_per, ife2_per=ife2_per, grads=grads)


def test_generated_maps(run):
    g, maps = run["g"], run["maps"]
    for k in ("pred1", "pred2", "qlabel"):
        g.check_probe(f"ccp.{k}_map", torch.as_tensor(maps[k]), "exact")


@pytest.mark.parametrize("i,c", list(enumerate(LEVELS)))
def test_level_values(run, i, c):
    g, ccp = run["g"], run["ccp"]
    lvl = ccp.levels[i]
    f1, f2 = run["f1"][i].detach(), run["f2"][i].detach()
    g.check(f"ccp.L{c}.pooled1", adaptive_pool_grid(f1, 3).reshape(4, c, 3, 3), "f64")
    g.check(f"ccp.L{c}.pooled2", adaptive_pool_grid(f2, 3).reshape(4, c, 3, 3), "f64")
    for k, f in ((1, f1), (2, f2)):
        mask = resize_mask(run["pred"][k - 1], f.shape[2:])
        counts = mask.sum((2, 3)).to(torch.int64).tolist()
        assert counts == g.scalar(f"ccp.L{c}.mask{k}_counts"), f"L{c} mask{k} counts"
        # the reference's exact rule for an even stride: >= 3 of the 4 centre pixels of the block
        s = 256 // f.shape[-1]
        centre = run["pred"][k - 1][..., s // 2 - 1::s, :][..., s // 2 - 1::s] + \
            run["pred"][k - 1][..., s // 2::s, :][..., s // 2 - 1::s] + \
            run["pred"][k - 1][..., s // 2 - 1::s, :][..., s // 2::s] + \
            run["pred"][k - 1][..., s // 2::s, :][..., s // 2::s]
        assert torch.equal(mask, (centre >= 3).to(mask.dtype))
    # prototypes under the predicted masks (they do not read the queues)
    for k, f in ((1, f1), (2, f2)):
        g.check(f"ccp.L{c}.proto{k}", lvl.prototypes(f, run["pred"][k - 1]), "f64")
    g.check(f"ccp.L{c}.ic_cells", lvl.ic_cells(f1, f2), "f64")
    g.check(f"ccp.L{c}.ic", run["ic_per"][i], "f32")
    g.check(f"ccp.L{c}.ife1", run["ife1_per"][i], "f32")
    g.check(f"ccp.L{c}.ife2", run["ife2_per"][i], "f32")


@pytest.mark.parametrize("i,c", list(enumerate(LEVELS)))
def test_level_ife_classes(run, i, c):
    """Per-class IFE before the float32 buffer; needs the queues as they were BEFORE the update."""
    g = run["g"]
    lvl = CCPLevel(4, c, queue_size=1440).double()
    lvl.load_queues(*run["q_before"][i], run["ptr0"])
    f1, f2 = run["f1"][i].detach(), run["f2"][i].detach()
    got = torch.stack([lvl.ife_classes(f1, run["pred"][0], 1),
                       lvl.ife_classes(f2, run["pred"][1], 2)])
    g.check(f"ccp.L{c}.ife_classes", got, "f64")


def test_totals(run):
    g = run["g"]
    for key in ("ic", "ife1", "ife2"):
        assert run[key].dtype == torch.float32
        g.check(f"ccp.{key}", run[key], "f32")


@pytest.mark.parametrize("i,c", list(enumerate(LEVELS)))
def test_gradients(run, i, c):
    g, gr, n = run["g"], run["grads"], len(LEVELS)
    g.check(f"ccp.grad_ic.f1_{c}", gr["ic"][i], "f32")
    g.check(f"ccp.grad_ic.f2_{c}", gr["ic"][n + i], "f32")
    g.check(f"ccp.grad_ife1.f1_{c}", gr["ife1"][i], "f32")
    g.check(f"ccp.grad_ife2.f2_{c}", gr["ife2"][i], "f32")


@pytest.mark.parametrize("i,c", list(enumerate(LEVELS)))
@pytest.mark.parametrize("k", (1, 2))
def test_queue_update(run, i, c, k):
    g, lvl = run["g"], run["ccp"].levels[i]
    assert g.scalar(f"ccp.L{c}.Q{k}.updated") is True
    slots = g.scalar(f"ccp.L{c}.Q{k}.slots")
    assert int(lvl.ptr(k)) == g.scalar(f"ccp.L{c}.Q{k}.ptr_after")
    q_new, q_old = lvl.queue(k), run["q_before"][i][k - 1]
    idx = torch.tensor(slots)[:, None, :].expand(-1, c, -1)
    g.check(f"ccp.L{c}.Q{k}.written", q_new.gather(2, idx), "f64")
    untouched = torch.ones_like(q_new, dtype=torch.bool).scatter_(2, idx, False)
    assert untouched.sum() == 4 * c * (1440 - 4)
    assert torch.equal(q_new[untouched], q_old[untouched])
