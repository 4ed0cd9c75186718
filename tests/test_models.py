"""Architecture tests of the UC-Seg networks (docs/method.md §1.2, §1.4): shapes, exact parameter
counts, dropout/norm placement, patch order, the attention block against an explicit oracle,
dtype/layout behaviour. Golden parity of the UPG lives in test_golden_upg.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from golden import golden
from ucseg_fast.models import (UPG, CrossAttentionBlock, FusionHead, ModelOutput, UCSeg, UNet2D, VNet2D,
                               build_ucseg_2d, evidential_uncertainty_torch)
from ucseg_fast.models.upg import Patchify, unpatchify


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("net_cls", [UNet2D, VNet2D])
def test_subnet_shapes(net_cls):
    torch.manual_seed(0)
    z, feats = net_cls(in_channels=3, num_classes=4)(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, 4, 64, 64)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 64, 64), (2, 32, 32, 32), (2, 64, 16, 16),
                                               (2, 128, 8, 8), (2, 256, 4, 4)]


def test_ucseg_shapes_64():
    torch.manual_seed(0)
    model = build_ucseg_2d(num_classes=4, img_size=(64, 64), patch_size=16)
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, ModelOutput)
    for t in (out.z1, out.z2, out.P):
        assert t.shape == (2, 4, 64, 64)
    for t in (out.u1, out.u2, out.A):
        assert t.shape == (2, 1, 64, 64)
    assert len(out.feats1) == len(out.feats2) == 5
    for f1, f2 in zip(out.feats1[-3:], out.feats2[-3:]):      # the CCP levels agree across subnets
        assert f1.shape == f2.shape
    # u is the vacuity of the returned logits, A·z feeds the head
    torch.testing.assert_close(out.u1, evidential_uncertainty_torch(out.z1))
    assert bool(((out.u1 > 0) & (out.u1 <= 1)).all())


def test_ucseg_shapes_256_predict():
    torch.manual_seed(0)
    model = build_ucseg_2d().eval()                     # the ACDC configuration, 256², patch 16
    P = model.predict(torch.randn(1, 3, 256, 256))
    assert P.shape == (1, 4, 256, 256) and not P.requires_grad


# ----- parameter counts (by hand) -----------------------------------------------------------------
def test_param_count_unet():
    # ConvBlock(i, o) = conv3x3 (9io + o) + BN (2o) + conv3x3 (9o² + o) + BN (2o) = 9io + 9o² + 6o
    # encoder: (3,16) 2832 + (16,32) 14016 + (32,64) 55680 + (64,128) 221952 + (128,256) 886272 = 1180752
    # UpBlock(d, s, o) = conv1x1 (ds + s) + ConvBlock(2s, o):
    #   (256,128,128) 32896 + 443136 = 476032;  (128,64,64) 8256 + 110976 = 119232
    #   (64,32,32) 2080 + 27840 = 29920;        (32,16,16) 528 + 7008 = 7536
    # out conv3x3 16→4: 576 + 4 = 580;  decoder = 633300;  total = 1814052
    assert n_params(UNet2D(3, 4)) == 1_814_052


def test_param_count_vnet():
    # conv3x3(i,o) = 9io + o; conv2x2 / convT2x2 = 4io + o (n = 16)
    # block_one 3→16: 448;  dw 16→32: 2080;  block_two 2×(32,32): 18496;  dw 32→64: 8256
    # block_three 3×(64,64): 110784;  dw 64→128: 32896;  block_four 3×(128,128): 442752
    # dw 128→256: 131328;  block_five 3×(256,256): 1770240;  up 256→128: 131200
    # block_six 3×(128,128): 442752;  up 128→64: 32832;  block_seven 3×(64,64): 110784
    # up 64→32: 8224;  block_eight 2×(32,32): 18496;  up 32→16: 2064;  block_nine 16→16: 2320
    # out conv1x1 16→4: 68;  total = 3266020
    assert n_params(VNet2D(3, 4, 16)) == 3_266_020


def test_param_count_upg():
    # head: conv weights 8·16 + 16·32 + 32·64 + 64·32 + 32·16 + 16·4 = 5312; BN γ,β 2·164 = 328 → 5640
    # cross-attention (N = 256 tokens, patch_dim 256, d 96, inner 512, FFN 384):
    #   pos 256·96 = 24576;  embed 256·96 + 96 = 24672;  temperature 8
    #   w_q, w_k, w_v 3·(96·512 + 512) = 148992;  attn out 512·96 + 96 = 49248
    #   FFN 96·384 + 384 = 37248 and 384·96 + 96 = 36960;  unpatchify Linear 96·256 + 256 = 24832
    #   → 346536;  total = 352176
    assert n_params(UPG(4, (256, 256), 16)) == 352_176


# ----- layers where the reference puts them ---------------------------------------------------------
def test_unet_dropout_train_only():
    torch.manual_seed(0)
    net = UNet2D(3, 4)
    ps = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert ps == [0.05, 0.1, 0.2, 0.3, 0.5, 0.0, 0.0, 0.0, 0.0]    # encoder levels, then decoder
    x = torch.randn(2, 3, 32, 32)
    net.train()
    a, b = net(x)[0], net(x)[0]
    assert not torch.allclose(a, b)                                   # dropout masks differ
    net_nodrop = UNet2D(3, 4, dropout=(0, 0, 0, 0, 0))
    net_nodrop.load_state_dict(net.state_dict())
    net_nodrop.train()
    torch.testing.assert_close(net_nodrop(x)[0], net_nodrop(x)[0], rtol=0, atol=0)   # BN alone is deterministic
    net.eval()
    torch.testing.assert_close(net(x)[0], net(x)[0], rtol=0, atol=0)


def test_reference_state_dict_names():
    unet = UNet2D().state_dict()
    for k in ("encoder.in_conv.conv_conv.0.weight", "encoder.in_conv.conv_conv.1.running_var",
              "encoder.down4.maxpool_conv.1.conv_conv.4.weight", "decoder.up1.conv1x1.weight",
              "decoder.up4.conv.conv_conv.5.bias", "decoder.out_conv.weight"):
        assert k in unet, k
    vnet = VNet2D().state_dict()
    for k in ("block_one.conv.0.weight", "block_five.conv.4.bias", "block_four_dw.conv.0.weight",
              "block_five_up.conv.0.weight", "block_nine.conv.0.weight", "out_conv.weight"):
        assert k in vnet, k


def test_vnet_no_norm_and_kaiming_init():
    torch.manual_seed(0)
    net = VNet2D(3, 4, 16)
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm, nn.Dropout, nn.Dropout2d)
    assert not any(isinstance(m, norm_types) for m in net.modules())
    # kaiming_normal_ fan_in, gain √2: std = √(2 / fan_in); 590k samples → ~0.2 % sampling error
    w = net.block_five.conv[0].weight.detach()
    assert abs(float(w.std()) / math.sqrt(2 / (256 * 9)) - 1) < 0.01
    wt = net.block_five_up.conv[0].weight.detach()                   # ConvTranspose [in, out, k, k]: fan_in = out·k²
    assert abs(float(wt.std()) / math.sqrt(2 / (128 * 4)) - 1) < 0.01


# ----- evidential uncertainty -----------------------------------------------------------------------
def test_evidential_uncertainty_by_hand():
    z = torch.tensor([[0.0, 0.0], [25.0, -25.0], [20.0, 20.0]], dtype=torch.float64).T.reshape(1, 2, 3, 1)
    u = evidential_uncertainty_torch(z)
    # C = 2: softplus(0) = ln 2; softplus(25) = 25 (above threshold), softplus(-25) = log1p(e^-25)
    want = torch.tensor([2 / (2 + 2 * math.log(2)), 2 / (2 + 25 + math.log1p(math.exp(-25))),
                         2 / (2 + 2 * math.log1p(math.exp(20)))], dtype=torch.float64).reshape(1, 1, 3, 1)
    torch.testing.assert_close(u, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_evidential_uncertainty_half_computes_in_fp32(dtype):
    torch.manual_seed(0)
    z = (torch.randn(2, 4, 8, 8) * 5).to(dtype)
    u = evidential_uncertainty_torch(z)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, evidential_uncertainty_torch(z.double()).float(), rtol=1e-6, atol=0)


# ----- cross-attention block --------------------------------------------------------------------------
def test_patchify_order_and_inverse():
    x = torch.arange(32 * 48, dtype=torch.float64).reshape(1, 1, 32, 48)
    t = Patchify(16)(x)
    assert t.shape == (1, 6, 256)
    # token n = 3i + j holds rows 16i…, cols 16j…; feature 16p + q is pixel (16i+p, 16j+q)
    for i, j, p, q in [(0, 0, 0, 0), (1, 2, 3, 5), (0, 1, 15, 15), (1, 0, 7, 9)]:
        assert t[0, 3 * i + j, 16 * p + q] == x[0, 0, 16 * i + p, 16 * j + q]
    assert torch.equal(unpatchify(t, (32, 48), 16), x)
    x3 = torch.randn(2, 1, 16, 32, 48)
    t3 = Patchify(8)(x3)
    assert t3.shape == (2, 2 * 4 * 6, 512)
    assert t3[1, 1 * 24 + 2 * 6 + 3, 64 * 1 + 8 * 2 + 5] == x3[1, 0, 8 + 1, 16 + 2, 24 + 5]
    assert torch.equal(unpatchify(t3, (16, 32, 48), 8), x3)


def _explicit_block(blk: CrossAttentionBlock, u1, u2):
    """Oracle: the reference's math written out with plain matmuls and an explicit softmax."""
    p, H, W = blk.patch_size, *blk.img_size
    B = u1.shape[0]

    def patch(u):
        return u.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)

    E, a = blk.to_patch_embedding[1], blk.attn
    t1 = patch(u1) @ E.weight.T + E.bias + blk.pos_embed
    t2 = patch(u2) @ E.weight.T + E.bias + blk.pos_embed
    heads, dh = a.heads, a.dim_head

    def split(t):
        return t.reshape(B, -1, heads, dh).permute(0, 2, 1, 3)

    q, k, v = (split(t @ l.weight.T + l.bias) for t, l in ((t1, a.w_q), (t2, a.w_k), (t2, a.w_v)))
    attn = torch.softmax((q @ k.transpose(-1, -2)) * dh ** -0.5, dim=-1)
    h0 = (attn @ v).permute(0, 2, 1, 3).reshape(B, -1, heads * dh) @ a.to_out[0].weight.T + a.to_out[0].bias
    f0, f1 = blk.MLP.net[0], blk.MLP.net[3]
    h1 = F.gelu(h0 @ f0.weight.T + f0.bias) @ f1.weight.T + f1.bias + h0
    out = h1 @ blk.to_out[0].weight.T + blk.to_out[0].bias
    return out.reshape(B, H // p, W // p, p, p).permute(0, 1, 3, 2, 4).reshape(B, 1, H, W)


def test_cross_attention_matches_explicit_oracle_f64():
    torch.manual_seed(0)
    blk = CrossAttentionBlock((32, 48), patch_size=16, embed_dim=24, heads=4, dim_head=16, mlp_dim=40).double().eval()
    u1, u2 = torch.rand(2, 1, 32, 48, dtype=torch.float64), torch.rand(2, 1, 32, 48, dtype=torch.float64)
    with torch.no_grad():   # bigger weights so the softmax is far from uniform
        blk.attn.w_q.weight.mul_(8)
        blk.attn.w_k.weight.mul_(8)
    A = blk(u1, u2)
    torch.testing.assert_close(A, _explicit_block(blk, u1, u2), rtol=1e-12, atol=1e-13)
    # train mode: token / output dropout (p = 0.1) is live
    blk.train()
    assert not torch.allclose(blk(u1, u2), A)


def test_cross_attention_asymmetric_and_temperature_unused():
    torch.manual_seed(0)
    blk = CrossAttentionBlock((32, 32), patch_size=16).eval()
    u1, u2 = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    A = blk(u1, u2)
    assert not torch.allclose(A, blk(u2, u1))          # u1 → query, u2 → key/value
    A.sum().backward()
    assert blk.attn.temperature.grad is None and blk.attn.temperature.shape == (8, 1, 1)


def test_cross_attention_3d():
    torch.manual_seed(0)
    blk = CrossAttentionBlock((32, 32, 32), patch_size=16, embed_dim=32, heads=2, dim_head=16, mlp_dim=64)
    assert blk.pos_embed.shape == (1, 8, 32) and blk.to_patch_embedding[1].in_features == 16 ** 3
    u1, u2 = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    A = blk.eval()(u1, u2)
    assert A.shape == (2, 1, 32, 32, 32)
    # unpatchify placement: token 5 = grid cell (1, 0, 1) fills A[16:32, 0:16, 16:32] in (p1 p2 p3) order
    with torch.no_grad():
        t1, t2 = (blk.to_patch_embedding(u) + blk.pos_embed for u in (u1, u2))
        h = blk.attn(t1, t2)
        tokens_out = blk.to_out(blk.MLP(h) + h)
    torch.testing.assert_close(A[:, 0, 16:32, 0:16, 16:32].reshape(2, -1), tokens_out[:, 5])
    with pytest.raises(ValueError, match="expected"):
        blk(torch.rand(2, 1, 32, 32, 16), u2)


# ----- fusion head / UPG --------------------------------------------------------------------------------
def test_fusion_head_by_hand():
    torch.manual_seed(0)
    head = FusionHead(3).double()
    assert [m.__class__ for m in head.conv6] == [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU]
    assert all(getattr(head, f"conv{i}")[0].bias is None for i in range(1, 7))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    P = head.train()(x)
    y = x
    for i in range(1, 7):
        conv = getattr(head, f"conv{i}")[0]
        y = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], y)
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = F.leaky_relu((y - mean) / torch.sqrt(var + 1e-5), 0.2)       # γ = 1, β = 0 at init
    torch.testing.assert_close(P, y, rtol=1e-12, atol=1e-12)


def test_upg_state_dict_keys_match_golden():
    g = golden()
    want = [k[len("upg.sd."):] for k in g.meta["tensors"] if k.startswith("upg.sd.")]
    assert len(want) == 54
    assert list(UPG(4, (256, 256), 16).state_dict().keys()) == want     # same names, same order


def test_ucseg_swappable_uncertainty_and_dtypes():
    torch.manual_seed(0)
    calls = []

    def fn(z):
        calls.append(z.shape)
        return evidential_uncertainty_torch(z)

    model = build_ucseg_2d(img_size=(32, 32))
    model = UCSeg(model.net_1, model.net_2, model.upg, 4, uncertainty_fn=fn).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    assert calls == [(2, 4, 32, 32)] * 2 and out.P.dtype == torch.float64
    # channels_last input gives the same numbers (float64: only summation order may differ)
    out_cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl.P, out.P, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_cl.A, out.A, rtol=1e-10, atol=1e-10)


def test_ucseg_bf16_autocast_train_step():
    """bf16 autocast + channels_last: a train-mode step stays finite and close to fp32."""
    torch.manual_seed(0)
    model = build_ucseg_2d(img_size=(32, 32)).train()
    for m in model.modules():        # no dropout (UNet and cross-attention): the two passes must agree
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    P32 = model(x).P.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.P.float().square().mean() + out.z1.float().square().mean() + out.z2.float().square().mean()
    assert out.u1.dtype == torch.float32                  # vacuity is computed in fp32 from bf16 logits
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    assert model.upg.final_head.conv1[0].weight.grad is not None
    for i in range(1, 7):
        bn = getattr(model.upg.final_head, f"conv{i}")[1]
        assert bn.running_var.dtype == torch.float32 and bool(torch.isfinite(bn.running_var).all())
    # batch-normalised fused logits are O(1); bf16 (8-bit mantissa) through ~20 layers stays within a few %
    err = float((out.P.detach().float() - P32).abs().max())
    assert err < 0.05 * float(P32.abs().max()), err
