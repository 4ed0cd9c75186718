"""UPG — the uncertainty-guided pseudo-label generator (docs/method.md §1.4, docs/golden.md §6 (UPG, item 2)).

Three pieces, all named as in the reference (``module/generate_pseudo_map_attention_2D.py``) so
that the authors' state_dict loads key for key:

* :func:`evidential_uncertainty_torch` — Dirichlet vacuity ``u = C / Σ_c (softplus(z_c) + 1)``;
* :class:`CrossAttentionBlock` — one ViT-style layer, queries from ``u1`` tokens, keys/values
  from ``u2`` tokens; no LayerNorm, no residual around the attention, residual around the FFN;
* :class:`FusionHead` — six bias-free 1×1 convs, each followed by BatchNorm and LeakyReLU(0.2)
  (also the last: negative fused logits are compressed ×0.2, a reference quirk kept on purpose).

Everything is dimension-generic (2D ``[B,1,H,W]`` or 3D ``[B,1,D,H,W]``).

Token-layout path (the "fused UPG", docs/method.md §6.2/§6.7): :meth:`UPG.forward_fused_tokens` takes
the logits and keeps the uncertainty maps and the attention output in the patch-token layout
``[B, N, p^d]`` the attention works in: the evidential kernel writes ``u`` directly as tokens
(no Patchify copy), :meth:`CrossAttentionBlock.forward_tokens` runs the block token to token
(its GEMMs stay on cuBLAS; no unpatchify), and the fused head reads ``A`` from the tokens,
computing each pixel's token index inside its sweeps (and writes ``dA`` back as tokens).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.evidential import evidential_uncertainty
from ..ops.upg_head import fusion_head_layers

__all__ = ["evidential_uncertainty_torch", "Patchify", "unpatchify", "CrossAttention",
           "FeedForward", "CrossAttentionBlock", "FusionHead", "FusedFusionHead", "UPG"]


def evidential_uncertainty_torch(z: Tensor) -> Tensor:
    """Vacuity ``u = C / Σ_c (softplus(z_c) + 1)`` of logits ``z [B,C,*S]`` → ``[B,1,*S]``.

    Computed exactly as the reference does (softplus β=1, threshold 20; ``+1`` per channel, then
    the channel sum; ``C / S`` which PyTorch evaluates as ``reciprocal(S) · C``). Half inputs are
    promoted to float32 (the sum of C evidences needs more than a 8-bit mantissa); float32 and
    float64 stay as they are. Differentiable; nothing is detached, as in the reference.
    """
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    alpha = F.softplus(z) + 1
    S = torch.sum(alpha, dim=1, keepdim=True)
    return z.shape[1] / S


def _grid(spatial: Sequence[int], patch: int, where: str) -> list[int]:
    if any(s % patch for s in spatial):
        raise ValueError(f"{where}: spatial size {tuple(spatial)} is not a multiple of patch size {patch}")
    return [s // patch for s in spatial]


class Patchify(nn.Module):
    """``[B,c,*S] -> [B,N,p^d·c]``: the reference's ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``.

    Tokens are row-major over the patch grid, features row-major inside a patch (channel last).
    Parameter-free; it is index 0 of ``to_patch_embedding`` so the Linear keeps the key ``.1``.
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        B, c, *spatial = x.shape
        p, d = self.patch_size, len(spatial)
        g = _grid(spatial, p, "Patchify")
        inter = [v for gi in g for v in (gi, p)]                       # (g0, p, g1, p, …)
        perm = [0, *[2 + 2 * i for i in range(d)], *[3 + 2 * i for i in range(d)], 1]
        n_tokens = 1
        for gi in g:
            n_tokens *= gi
        return x.reshape(B, c, *inter).permute(perm).reshape(B, n_tokens, p ** d * c)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


def unpatchify(tokens_BNF: Tensor, spatial: Sequence[int], patch: int, channels: int = 1) -> Tensor:
    """Exact inverse of :class:`Patchify`: ``[B,N,p^d·c] -> [B,c,*spatial]``."""
    B = tokens_BNF.shape[0]
    d = len(spatial)
    g = _grid(spatial, patch, "unpatchify")
    x = tokens_BNF.reshape(B, *g, *([patch] * d), channels)
    perm = [0, 2 * d + 1, *[v for i in range(d) for v in (1 + i, 1 + d + i)]]
    return x.permute(perm).reshape(B, channels, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention, queries from ``x_q``, keys and values from ``x_kv``; no attention dropout.

    ``temperature`` is declared by the reference but never used; it is kept (never gets a
    gradient) so that checkpoints load strictly.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.w_q = nn.Linear(dim, inner)
        self.w_k = nn.Linear(dim, inner)
        self.w_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split(self, t_BNI: Tensor) -> Tensor:
        B, N, _ = t_BNI.shape
        return t_BNI.view(B, N, self.heads, self.dim_head).transpose(1, 2)   # [B,h,N,dh]

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        q, k, v = self._split(self.w_q(x_q)), self._split(self.w_k(x_kv)), self._split(self.w_v(x_kv))
        # Same math as softmax(q kᵀ · dh^-½) v (checked in float64 by the tests); on GPU this
        # dispatches to flash/memory-efficient kernels and never materialises the [B,h,N,N] scores.
        o_BhNd = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        B, _, N, _ = o_BhNd.shape
        return self.to_out(o_BhNd.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """Linear → GELU (exact erf) → Dropout → Linear → Dropout (both p = 0 in the reference)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttentionBlock(nn.Module):
    """``A = CrossAttn(u1 → query, u2 → key/value)``, ``[B,1,*S] × 2 → [B,1,*S]``.

    ``t = Dropout(E(patchify(u)) + pos)`` for both maps (shared E and pos);
    ``h0 = Attn(t1, t2)`` (no residual); ``h1 = FFN(h0) + h0``;
    ``A = unpatchify(Dropout(Linear(h1)))``. ``pos`` is tied to ``img_size`` (randn init), so the
    block only runs at the training resolution, as in the reference.

    :meth:`forward_tokens` is the same block on patch tokens ``[B, N, p^d]`` (no Patchify, no
    unpatchify); :meth:`forward` is ``unpatchify(forward_tokens(patchify(u1), patchify(u2)))``.
    """

    def __init__(self, img_size: Sequence[int] = (256, 256), patch_size: int = 16, embed_dim: int = 96,
                 heads: int = 8, dim_head: int = 64, mlp_dim: int = 384, dropout: float = 0.1) -> None:
        super().__init__()
        self.img_size = tuple(int(s) for s in img_size)
        if len(self.img_size) not in (2, 3):
            raise ValueError(f"CrossAttentionBlock: img_size {img_size} must have 2 or 3 entries")
        self.patch_size = patch_size
        grid = _grid(self.img_size, patch_size, "CrossAttentionBlock")
        num_tokens = 1
        for gi in grid:
            num_tokens *= gi
        patch_dim = patch_size ** len(self.img_size)              # one input channel
        # Own parameters are registered before the submodules: state_dict order = reference order.
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, embed_dim))
        self.to_patch_embedding = nn.Sequential(Patchify(patch_size), nn.Linear(patch_dim, embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.attn = CrossAttention(embed_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.MLP = FeedForward(embed_dim, mlp_dim, dropout=0.0)
        self.to_out = nn.Sequential(nn.Linear(embed_dim, patch_dim), nn.Dropout(dropout))

    def forward(self, u1: Tensor, u2: Tensor) -> Tensor:
        """``[B,1,*S] × 2 -> A [B,1,*S]`` (Patchify and unpatchify copies around :meth:`_body`)."""
        for name, u in (("u1", u1), ("u2", u2)):
            if tuple(u.shape[2:]) != self.img_size or u.shape[1] != 1:
                raise ValueError(f"CrossAttentionBlock: {name} has shape {tuple(u.shape)}, "
                                 f"expected [B, 1, {', '.join(map(str, self.img_size))}]")
        patchify = self.to_patch_embedding[0]
        return unpatchify(self._body(patchify(u1), patchify(u2)), self.img_size, self.patch_size)

    def forward_tokens(self, t1_BNF: Tensor, t2_BNF: Tensor) -> Tensor:
        """Patch tokens ``[B, N, p^d] × 2 -> A`` as tokens ``[B, N, p^d]`` (``Patchify`` order).

        The same computation as :meth:`forward` (same parameters, same dropout draws in the same
        order) without the Patchify copy of the inputs and the unpatchify copy of the output: feed
        it ``evidential_uncertainty(z, patch_size=p)`` and hand the result to the fused head with
        ``a_patch_size=p``."""
        n_tok, feat = self.pos_embed.shape[1], self.to_patch_embedding[1].in_features
        for name, t in (("t1", t1_BNF), ("t2", t2_BNF)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (n_tok, feat):
                raise ValueError(f"CrossAttentionBlock.forward_tokens: {name} has shape {tuple(t.shape)}, "
                                 f"expected tokens [B, {n_tok}, {feat}] (patch size {self.patch_size}, "
                                 f"img_size {self.img_size})")
        return self._body(t1_BNF, t2_BNF)

    def _body(self, t1_BNF: Tensor, t2_BNF: Tensor) -> Tensor:
        embed = self.to_patch_embedding[1]
        t1_BNE = self.dropout(embed(t1_BNF) + self.pos_embed)
        t2_BNE = self.dropout(embed(t2_BNF) + self.pos_embed)
        h_BNE = self.attn(t1_BNE, t2_BNE)
        h_BNE = self.MLP(h_BNE) + h_BNE
        return self.to_out(h_BNE)


class FusionHead(nn.Module):
    """Per-pixel MLP ``2C → 16 → 32 → 64 → 32 → 16 → C`` as bias-free 1×1 convs + BN + LeakyReLU(0.2).

    The reference's ``Generate_pseudo_simple``; keys ``conv{i}.0.weight`` and ``conv{i}.1.*``.
    BN runs on batch statistics in training (cuDNN/ATen accumulate them in fp32 also for bf16
    activations under autocast).
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 32, 16),
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"FusionHead: spatial_dims {spatial_dims} must be 2 or 3")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        chans = [2 * num_classes, *widths, num_classes]
        self.num_layers = len(chans) - 1
        for i in range(self.num_layers):
            # In-place LeakyReLU: BN's backward needs its input, not its output.
            self.add_module(f"conv{i + 1}", nn.Sequential(
                conv(chans[i], chans[i + 1], kernel_size=1, bias=False),
                norm(chans[i + 1]),
                nn.LeakyReLU(0.2, inplace=True)))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"conv{i}")(x)
        return x


class FusedFusionHead(FusionHead):
    """:class:`FusionHead` computed by the recompute sweeps of ``ops/upg_head.py``.

    Same submodules, hence the same parameters, buffers and state_dict keys (checkpoints
    interchange both ways); the submodules only hold the state. :meth:`fused` takes
    ``(z1, z2, A)`` so ``cat(A·z1, A·z2)`` and the per-layer activations are never materialised.
    The layers' tensors go to the op as they are (``ops.upg_head.fusion_head_layers``: one kernel
    pointer per layer, nothing packed, padded or copied; the backward's kernels write each layer's
    gradients), and the running statistics are updated by the op's kernels exactly as
    ``nn.BatchNorm`` does (device-side, no host sync).
    """

    #: the kernels read the fp32 weights themselves (TF32 / exact dots, `dot_precision`): the
    #: step's one-op bf16 weight cast (`train.precision.WeightCast`) leaves them alone
    keep_fp32_weights = True

    def fused(self, z1: Tensor, z2: Tensor, A: Tensor, *, a_patch_size: int | None = None) -> Tensor:
        """``P [B,C,*S] = head(cat(A·z1, A·z2))`` without materialising the concatenation.

        ``A``: ``[B,1,*S]``, or with ``a_patch_size=p`` the patch tokens ``[B, N, p^d]``
        (``Patchify(p)`` order) read in place; ``A``'s gradient comes back in ``A``'s layout."""
        return self.fused_with_stats(z1, z2, A, a_patch_size=a_patch_size)[0]

    def fused_with_stats(self, z1: Tensor, z2: Tensor, A: Tensor, *,
                         a_patch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, mean [6,W], var [6,W])``: also the biased batch statistics (training) or the
        running statistics (eval) each BatchNorm used, zero-padded to the widest layer W.
        ``a_patch_size`` as in :meth:`fused`."""
        layers = [getattr(self, f"conv{i + 1}") for i in range(self.num_layers)]
        convs, bns = [m[0] for m in layers], [m[1] for m in layers]
        eps, momentum = bns[0].eps, bns[0].momentum
        if any(bn.eps != eps or bn.momentum != momentum or not bn.track_running_stats or not bn.affine
               for bn in bns):
            raise ValueError("FusedFusionHead: every BatchNorm needs the same eps and momentum, "
                             "affine=True and track_running_stats=True")
        return fusion_head_layers(
            z1, z2, A, [c.weight for c in convs], [bn.weight for bn in bns], [bn.bias for bn in bns],
            [bn.running_mean for bn in bns], [bn.running_var for bn in bns],
            [bn.num_batches_tracked for bn in bns], self.training, eps, momentum, a_patch_size=a_patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Drop-in for ``FusionHead.forward(cat(z1', z2'))``: split the input, A = 1."""
        C = x.shape[1] // 2
        return self.fused(x[:, :C], x[:, C:], x.new_ones((x.shape[0], 1, *x.shape[2:])))


class UPG(nn.Module):
    """``forward(u1, u2, z1, z2) -> (A [B,1,*S], P [B,C,*S])``, ``P = head(cat([A·z1, A·z2], 1))``.

    ``final_head`` is registered first so that ``state_dict()`` lists keys in the reference order.
    ``head_impl``: ``"torch"`` (the reference module) or ``"fused"`` (:class:`FusedFusionHead`,
    same state_dict; the head is recomputed from (z1, z2, A) instead of storing activations).
    With ``head_impl="fused"``, :meth:`forward_fused_tokens` runs the whole module from the logits
    with ``u`` and ``A`` kept in patch-token layout (no Patchify/unpatchify copies).
    """

    def __init__(self, num_classes: int, img_size: Sequence[int], patch_size: int, embed_dim: int = 96,
                 heads: int = 8, dim_head: int = 64, mlp_dim: int = 384, dropout: float = 0.1,
                 head_impl: str = "torch") -> None:
        super().__init__()
        if head_impl not in ("torch", "fused"):
            raise ValueError(f"UPG: head_impl {head_impl!r} must be 'torch' or 'fused'")
        self.head_impl = head_impl
        head_cls = FusedFusionHead if head_impl == "fused" else FusionHead
        self.final_head = head_cls(num_classes, spatial_dims=len(img_size))
        self.cross_attn = CrossAttentionBlock(img_size, patch_size, embed_dim, heads, dim_head, mlp_dim, dropout)

    def forward(self, u1: Tensor, u2: Tensor, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        A = self.cross_attn(u1, u2)
        if isinstance(self.final_head, FusedFusionHead):
            return A, self.final_head.fused(z1, z2, A)
        P = self.final_head(torch.cat([A * z1, A * z2], dim=1))
        return A, P

    def forward_fused_tokens(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(u1, u2, A, P)`` from the logits ``z1, z2 [B,C,*S]`` on the token-layout path.

        ``u1, u2`` (the evidential vacuities) and ``A`` come back in **patch-token layout**
        ``[B, N, p^d]`` (``Patchify(p)`` order: tokens row-major over the patch grid, features
        row-major inside a patch; ``p = cross_attn.patch_size``); ``unpatchify(t, img_size, p)``
        gives the ``[B,1,*S]`` maps of :meth:`forward`. ``P [B,C,*S]`` as in :meth:`forward`.
        Same values and gradients as ``forward(evidential_uncertainty_torch(z1), …(z2), z1, z2)``
        (to fp32 rounding): u is written as tokens by the evidential kernel, the block runs
        token to token (:meth:`CrossAttentionBlock.forward_tokens`), and the fused head reads A's
        tokens in place. Needs ``head_impl="fused"``."""
        if not isinstance(self.final_head, FusedFusionHead):
            raise ValueError(f"UPG.forward_fused_tokens needs head_impl='fused', this UPG has "
                             f"head_impl={self.head_impl!r}")
        img = self.cross_attn.img_size
        for name, z in (("z1", z1), ("z2", z2)):
            if z.dim() != 2 + len(img) or tuple(z.shape[2:]) != img:
                raise ValueError(f"UPG.forward_fused_tokens: {name} has shape {tuple(z.shape)}, "
                                 f"expected [B, C, {', '.join(map(str, img))}]")
        p = self.cross_attn.patch_size
        u1 = evidential_uncertainty(z1, patch_size=p)
        u2 = evidential_uncertainty(z2, patch_size=p)
        A = self.cross_attn.forward_tokens(u1, u2)
        return u1, u2, A, self.final_head.fused(z1, z2, A, a_patch_size=p)
