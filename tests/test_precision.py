"""train.precision.WeightCast: one cast op for every autocast weight, bit-identical to autocast;
models.unet2d.StepBatchNorm2d: one counter op a forward, the numbers of nn.BatchNorm2d."""
from __future__ import annotations

import copy

import pytest
import torch

from ucseg_fast.models import build_ucseg_2d
from ucseg_fast.models.unet2d import StepBatchNorm2d, advance_bn_counters
from ucseg_fast.train.precision import WeightCast, low_precision_params


def _run(model, wc, uses, x):
    torch.manual_seed(1)
    ctx = wc(uses=uses) if wc is not None else torch.enable_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), ctx:
        outs = [model(x * (0.5 + i)) for i in range(uses)]
        L = sum(o.P.float().square().mean() + o.z1.float().mean() + o.z2.float().mean()
                for o in outs)
    L.backward()
    return L.detach()


@pytest.mark.parametrize("uses", [1, 2])
def test_weight_cast_is_autocast(uses):
    torch.manual_seed(0)
    ref = build_ucseg_2d(img_size=(32, 32), head_impl="torch").train()
    mine = copy.deepcopy(ref)
    x = torch.randn(4, 3, 32, 32)
    a = _run(ref, None, uses, x)
    b = _run(mine, WeightCast(mine, torch.bfloat16), uses, x)
    assert torch.equal(a, b)  # the forward: the same bf16 weights, bit for bit
    # the UPG's patch embedding is applied to u1 and u2 in each forward: with two forwards its
    # four bf16 gradients are summed in another order than autocast's (bf16 rounding); every
    # weight used once per forward gets autocast's gradient bit for bit
    shared = {"upg.cross_attn.to_patch_embedding.1.weight",
              "upg.cross_attn.to_patch_embedding.1.bias"}
    for (n, p), (_, q) in zip(ref.named_parameters(), mine.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is None:
            continue
        assert q.grad.stride() == q.stride(), n  # laid out like the parameter
        if uses == 2 and n in shared:
            # bf16 sums of four terms with cancellation: compare norm-wise
            assert float((q.grad - p.grad).norm() / p.grad.norm()) < 1e-2, n
        else:
            assert torch.equal(p.grad, q.grad), n


def test_weight_cast_selects_what_autocast_casts():
    from torch import nn
    model = build_ucseg_2d(img_size=(32, 32), head_impl="fused")
    chosen = {id(p) for _, p in low_precision_params(model)}
    want = set()
    for name, mod in model.named_modules():
        if name.startswith("upg.final_head"):
            continue  # the fused head reads its fp32 weights itself (keep_fp32_weights)
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            want |= {id(p) for p in mod.parameters(recurse=False)}
    assert chosen == want and len(chosen) > 100
    assert not WeightCast(model, None)  # fp32 training: nothing to do


def test_one_cast_op_replaces_every_weight_cast():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = build_ucseg_2d(img_size=(32, 32), head_impl="torch").train()
    wc = WeightCast(model, torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    counts = []
    for ctx in (None, wc):
        with Count() as c, torch.autocast("cpu", dtype=torch.bfloat16), (ctx() if ctx else
                                                                        torch.enable_grad()):
            model(x)
        counts.append(sum(n.startswith("aten._to_copy") for n in c.names))
        if ctx is not None:
            assert c.names.count("ucseg.cast_params.default") == 1
    assert counts[0] - counts[1] == len(wc.params)  # only activations are still cast


def test_step_batchnorm_matches_batchnorm_and_counts_once():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4))
    mine = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), StepBatchNorm2d(4),
                               torch.nn.Conv2d(4, 4, 3), StepBatchNorm2d(4))
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 9, 9)
    for _ in range(2):
        advance_bn_counters(mine)
        torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=0)
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    mine.eval()
    advance_bn_counters(mine)  # eval: nothing advances
    assert int(mine[1].num_batches_tracked) == 2
    # momentum=None (the cumulative average) keeps PyTorch's own path
    cum = StepBatchNorm2d(4, momentum=None).train()
    cum(torch.randn(2, 4, 3, 3))
    assert int(cum.num_batches_tracked) == 1


def test_step_terms_accumulate_with_one_op():
    from ucseg_fast.train.objective import StepTerms
    from ucseg_fast.train.logbook import accumulate_terms, window_means
    acc, n = {}, {}
    p1 = StepTerms(("a", "_pad", "b"), torch.tensor([1.0, 9.0, 2.0]))
    p2 = StepTerms(("a", "_pad", "b", "c"), torch.tensor([3.0, 9.0, 4.0, 5.0]))
    assert list(p1) == ["a", "b"] and float(p1["b"]) == 2.0 and "_pad" not in p1
    for t in (p1, p1, p2):
        accumulate_terms(acc, t, n)
    keys, means = window_means(acc, n)
    assert keys == ["a", "b", "c"]  # padding slots are not logged
    got = dict(zip(keys, means.tolist()))
    assert got["a"] == pytest.approx(5 / 3) and got["b"] == pytest.approx(8 / 3)
    assert got["c"] == pytest.approx(5.0)
