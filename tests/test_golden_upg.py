"""Golden parity of the UPG path with the authors' code (the `evid.*` and `upg.*` golden keys).

The whole item-2 run (float64, [4,4,256,256], eval forward, train forward, backward of
Σ P_train·w) happens once in a module fixture; each test checks one group of keys with the
tolerance class that fits it (tests/golden/README.md).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from golden import golden
from ucseg_fast.models.upg import UPG, evidential_uncertainty_torch

HEAD_BN = range(1, 7)


# ----- item 1: evidential uncertainty ----------------------------------------------------------
def test_evid_u_and_grad():
    g = golden()
    z = g.tensor("evid.z").clone().requires_grad_(True)
    u = evidential_uncertainty_torch(z)
    assert u.dtype == torch.float64
    g.check("evid.u", u.detach(), "f64")
    (u * g.tensor("evid.w")).sum().backward()
    g.check("evid.du_dz", z.grad, "f64")


# ----- item 2: UPG -------------------------------------------------------------------------------
def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not hasattr(parent, leaf):
        raise KeyError(f"dropout_replaced_by_identity names {dotted!r}, which UPG does not have")
    setattr(parent, leaf, new)


def _golden_upg(g) -> UPG:
    cfg = g.meta["config"]
    upg = UPG(cfg["num_classes"], tuple(cfg["img_size"]), cfg["patch_size"]).double()
    sd = {k[len("upg.sd."):]: g.tensor(k) for k in g.meta["tensors"] if k.startswith("upg.sd.")}
    upg.load_state_dict(sd, strict=True)
    for name in g.meta["dropout_replaced_by_identity"]:
        assert isinstance(upg.get_submodule(name), nn.Dropout), f"{name} is not a Dropout in UPG"
        _set_submodule(upg, name, nn.Identity())
    assert not any(isinstance(m, nn.Dropout) for m in upg.modules()), "a Dropout was left in UPG"
    return upg


@pytest.fixture(scope="module")
def run():
    """One eval forward and one train forward + backward, as the reference was driven."""
    g = golden()
    upg = _golden_upg(g)
    z1, z2, u1, u2, w = (g.input(f"upg.in.{k}") for k in ("z1", "z2", "u1", "u2", "w"))
    out: dict[str, object] = {}

    upg.eval()
    with torch.no_grad():
        out["upg.P_eval"] = upg(u1, u2, z1, z2)[1]

    cap: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(_m, _inp, o):
            cap.setdefault(name, []).append(o.detach())
        return hook

    def keep_input(name):
        def hook(_m, inp):
            cap.setdefault(name, []).append(inp[0].detach())
        return hook

    ca, head = upg.cross_attn, upg.final_head
    hooks = [ca.dropout.register_forward_hook(keep("tokens")),
             ca.attn.w_q.register_forward_hook(keep("q")),
             ca.attn.w_k.register_forward_hook(keep("k")),
             ca.attn.w_v.register_forward_hook(keep("v")),
             ca.attn.register_forward_hook(keep("attn_out")),
             ca.to_out.register_forward_pre_hook(keep_input("ffn_out")),
             head.register_forward_pre_hook(keep_input("head_in"))]
    hooks += [getattr(head, f"conv{i}")[0].register_forward_hook(keep(f"conv{i}")) for i in HEAD_BN]

    upg.train()
    z1, z2, u1, u2 = (t.clone().requires_grad_(True) for t in (z1, z2, u1, u2))
    A, P = upg(u1, u2, z1, z2)
    for h in hooks:
        h.remove()
    loss = (P * w).sum()
    loss.backward()

    out.update({"upg.A": A.detach(), "upg.P_train": P.detach(), "upg.sum_Pw": loss.detach(),
                "upg.tokens1": cap["tokens"][0], "upg.tokens2": cap["tokens"][1],
                "upg.q": cap["q"][0], "upg.k": cap["k"][0], "upg.v": cap["v"][0],
                "upg.attn_out": cap["attn_out"][0], "upg.ffn_out": cap["ffn_out"][0],
                "upg.head_in": cap["head_in"][0],
                "upg.grad.z1": z1.grad, "upg.grad.z2": z2.grad, "upg.grad.u1": u1.grad, "upg.grad.u2": u2.grad})
    assert all(len(cap[k]) == 1 for k in ("q", "k", "v", "attn_out", "ffn_out", "head_in"))
    assert len(cap["tokens"]) == 2
    for i in HEAD_BN:
        y = cap[f"conv{i}"][0]
        bn = getattr(head, f"conv{i}")[1]
        out[f"upg.bn{i}.batch_mean"] = y.mean(dim=(0, 2, 3))
        out[f"upg.bn{i}.batch_var"] = y.var(dim=(0, 2, 3), unbiased=False)
        out[f"upg.bn{i}.running_mean_after"] = bn.running_mean.clone()
        out[f"upg.bn{i}.running_var_after"] = bn.running_var.clone()
        out[f"upg.bn{i}.num_batches_tracked"] = bn.num_batches_tracked.clone()
    out["params"] = dict(upg.named_parameters())
    return g, out


FORWARD_KEYS = ["upg.P_eval", "upg.A", "upg.tokens1", "upg.tokens2", "upg.q", "upg.k", "upg.v",
                "upg.attn_out", "upg.ffn_out", "upg.head_in", "upg.P_train", "upg.sum_Pw"]


@pytest.mark.parametrize("key", FORWARD_KEYS)
def test_upg_forward(run, key):
    g, out = run
    g.check(key, out[key], "f64")


@pytest.mark.parametrize("i", list(HEAD_BN))
def test_upg_batchnorm_stats(run, i):
    g, out = run
    for what in ("batch_mean", "batch_var", "running_mean_after", "running_var_after"):
        g.check(f"upg.bn{i}.{what}", out[f"upg.bn{i}.{what}"], "f64")
    assert int(out[f"upg.bn{i}.num_batches_tracked"]) == g.scalar("upg.num_batches_tracked_after")


@pytest.mark.parametrize("key", ["upg.grad.z1", "upg.grad.z2", "upg.grad.u1", "upg.grad.u2"])
def test_upg_input_grads(run, key):
    g, out = run
    g.check(key, out[key], "f64g")


def _param_grad_keys() -> list[str]:
    names = [f"final_head.conv{i}.{s}" for i in HEAD_BN for s in ("0.weight", "1.weight", "1.bias")]
    names += ["cross_attn." + n for n in (
        "pos_embed", "to_patch_embedding.1.weight", "to_patch_embedding.1.bias", "attn.temperature",
        "attn.w_q.weight", "attn.w_q.bias", "attn.w_k.weight", "attn.w_k.bias", "attn.w_v.weight",
        "attn.w_v.bias", "attn.to_out.0.weight", "attn.to_out.0.bias", "MLP.net.0.weight",
        "MLP.net.0.bias", "MLP.net.3.weight", "MLP.net.3.bias", "to_out.0.weight", "to_out.0.bias")]
    return names


def test_upg_param_grad_keys_cover_golden(run):
    g, out = run
    golden_names = {k[len("upg.grad.param."):].removesuffix(".rowsum").removesuffix(".colsum")
                    for k in (*g.meta["tensors"], *g.meta["probes"], *g.meta["scalars"])
                    if k.startswith("upg.grad.param.")}
    assert golden_names == set(_param_grad_keys())
    assert set(out["params"]) == golden_names


@pytest.mark.parametrize("name", _param_grad_keys())
def test_upg_param_grads(run, name):
    g, out = run
    key = f"upg.grad.param.{name}"
    grad = out["params"][name].grad
    if name == "cross_attn.attn.temperature":
        assert g.scalar(key) is None and grad is None   # unused by the forward: no gradient at all
    elif name == "cross_attn.attn.w_k.bias":
        # analytically zero: q·b_k shifts every score of a query equally; softmax ignores it
        g.check_zero(key, grad, "upg.grad.param.cross_attn.attn.w_k.weight")
    else:
        g.check(key, grad, "f64g")
