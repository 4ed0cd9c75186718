"""Pseudo-label rules of the fusion (reference) mode and the phase-2 copy-paste mix.

docs/method.md §6.4 (pseudo-label table) and §2.3 (copy-paste). The hard pseudo-label is built
from the fused logits P of the unlabeled half, detached, and used on every unlabeled pixel
(no confidence mask in the reference). The rules, per trainer:

| trainer                  | call                                            | rule |
|--------------------------|-------------------------------------------------|------|
| ACDC `--nms 1` (default) | `fusion_pseudo_label(P)`                        | argmax softmax(P), largest 8-CC per class 1..C−1 |
| ACDC `--nms 0`           | `fusion_pseudo_label(P, nms=False)`             | [softmax(P)_c > 0.5] per channel |
| 2D generic (binary)      | `fusion_pseudo_label(P, nms=False, binary=True)`| [σ(P_c) > 0.5] per channel |
| 3D `--nms 1` (default)   | `fusion_pseudo_label(P, binary=True)`           | [σ(P_1) ≥ 0.5], largest 26-CC, one-hot |
| 3D `--nms 0`             | `fusion_pseudo_label(P, nms=False, binary=True)`| [σ(P_c) > 0.5] per channel |

The reference 2D-generic trainer has no CC step: call it with `nms=False`.

Thresholds are compared on the fp32 (or float64) probability, not on the logit: fp32 σ rounds
to exactly 0.5 for 0 < P ≲ 1.2e-7, and bit parity needs the same compare. The connected
component step is `ucseg_fast.ops.components.largest_component` (GPU or CPU); everything else
is device-side and free of host syncs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ucseg_fast.losses import acc

__all__ = [
    "one_hot",
    "fusion_pseudo_label",
    "fusion_pseudo_label_map",
    "prediction_masks",
    "acdc_masks",
    "copy_paste_box_size",
    "copy_paste_box",
    "copy_paste_branch",
    "copy_paste_mask",
    "copy_paste_mix",
]


def _largest_component(labels_BS: torch.Tensor, num_classes: int) -> torch.Tensor:
    # Imported lazily: the op lives in ops/ and may pick a GPU or a CPU backend at call time.
    from ucseg_fast.ops.components import largest_component

    return largest_component(labels_BS, num_classes)


def one_hot(labels_BS: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, *S]` class map → `[B, C, *S]` one-hot in `dtype`.

    A compare against `arange(C)` rather than `F.one_hot`: no range check (a host sync on
    some backends), no channels-last permute copy, compile friendly.
    """
    C = int(num_classes)
    cls = torch.arange(C, device=labels_BS.device, dtype=labels_BS.dtype)
    cls = cls.view(1, C, *([1] * (labels_BS.dim() - 1)))
    return (labels_BS.unsqueeze(1) == cls).to(dtype)


def acdc_masks(logits: torch.Tensor, nms: bool = True) -> torch.Tensor:
    """Reference `get_ACDC_masks(output, nms)`: int64 `[B, *S]` class map.

    argmax_c softmax(logits) (first index on ties; computed on the probabilities, which can
    tie where the logits do not), then with `nms` per image and class 1..C−1 only the largest
    full-connectivity component (8 in 2D, 26 in 3D; equal sizes → the component whose first
    pixel in C order comes first); everything else becomes 0.
    """
    with torch.no_grad():
        k = torch.softmax(acc(logits), dim=1).argmax(dim=1)
        if nms:
            k = _largest_component(k, logits.shape[1])
        return k


def fusion_pseudo_label_map(
    P_u: torch.Tensor, nms: bool = True, *, binary: bool = False, threshold: float = 0.5
) -> torch.Tensor:
    """Class map `[B, *S]` (int64) of the pseudo-label of the fused logits `P_u`.

    ACDC (`binary=False`): `acdc_masks(P_u, nms)`. Binary/3D: nms → [σ(P_1) ≥ thr] + largest
    CC; no nms → [σ(P_1) > thr] (the foreground channel of the per-channel rule). With
    `nms=False` the per-channel one-hot of `fusion_pseudo_label` (rows may be all zero or,
    binary, both set) is not a class map; this returns the map described above instead.
    """
    with torch.no_grad():
        if not binary:
            return acdc_masks(P_u, nms)
        _check_binary(P_u)
        fg = torch.sigmoid(acc(P_u[:, 1]))
        if nms:
            return _largest_component((fg >= threshold).long(), 2)
        return (fg > threshold).long()


def fusion_pseudo_label(
    P_u: torch.Tensor, *, nms: bool = True, binary: bool = False, threshold: float = 0.5
) -> torch.Tensor:
    """Hard pseudo-label Y_u `[B, C, *S]`, float32 0/1, no gradient (docs/method.md §6.4 table)."""
    with torch.no_grad():
        C = P_u.shape[1]
        if nms:
            return one_hot(fusion_pseudo_label_map(P_u, True, binary=binary, threshold=threshold), C)
        if binary:
            _check_binary(P_u)
            return (torch.sigmoid(acc(P_u)) > threshold).to(torch.float32)
        return (torch.softmax(acc(P_u), dim=1) > threshold).to(torch.float32)


def prediction_masks(logits: torch.Tensor, nms: bool = True) -> torch.Tensor:
    """One-hot float32 `[B, C, *S]` of `get_ACDC_masks(logits, nms)` (IFE masks of z1, z2).

    With `nms=False` this is the plain argmax one-hot; the reference's ACDC `--nms 0` IFE
    path uses the soft probabilities instead (the CCP code passes softmax(z) there).
    """
    return one_hot(acdc_masks(logits, nms), logits.shape[1])


def _check_binary(P: torch.Tensor) -> None:
    if P.shape[1] != 2:
        raise ValueError(f"pseudo_labels: binary rule needs C = 2 channels [bg, fg], got shape {tuple(P.shape)}")


# --------------------------------------------------------------------------------------------
# Copy-paste (docs/method.md §2.3): one zero box per step, shared by all images and channels.
# --------------------------------------------------------------------------------------------


def copy_paste_box_size(n: int) -> int:
    """Box length ℓ = ⌊2n/3⌋ on an axis of size n (224 → 149, 256 → 170, 96 → 64)."""
    return (2 * n) // 3


def copy_paste_box(
    spatial_shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Box starts, int64 `[len(S)]`, drawn on `device`: o_i ~ U{0, …, n_i − ℓ_i − 1}.

    Same distribution as the reference's `np.random.randint(0, n − ℓ)` per axis (first axis
    first); drawn with torch on the device so no host round trip is needed. `generator` must
    live on `device`.
    """
    starts = [
        torch.randint(0, n - copy_paste_box_size(n), (1,), generator=generator, device=device,
                      dtype=torch.int64)
        for n in spatial_shape
    ]
    return torch.cat(starts)


def copy_paste_branch(generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """0-D bool device tensor, True (branch a) with probability 0.5 (`random.random() > 0.5`)."""
    return torch.rand((), generator=generator, device=device) > 0.5


def copy_paste_mask(
    spatial_shape: Sequence[int],
    starts: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """M `[*S]`: ones with a zero box `[o_i, o_i + ℓ_i)` on every axis (`generate_mask`).

    Built from device-side compares against `starts`, so a step that draws its box on the
    GPU never reads it on the host.
    """
    device = starts.device if device is None else device
    starts = starts.to(device)
    nd = len(spatial_shape)
    if starts.shape != (nd,):
        raise ValueError(f"copy_paste_mask: starts must have shape ({nd},), got {tuple(starts.shape)}")
    box: torch.Tensor | None = None
    for ax, n in enumerate(spatial_shape):
        idx = torch.arange(n, device=device, dtype=torch.int64)
        inside = (idx >= starts[ax]) & (idx < starts[ax] + copy_paste_box_size(n))
        inside = inside.view(*([1] * ax), n, *([1] * (nd - ax - 1)))
        box = inside if box is None else box & inside
    assert box is not None
    return (~box).to(dtype)


def copy_paste_mix(
    x_l: torch.Tensor,
    x_u: torch.Tensor,
    y_l: torch.Tensor,
    Y_u: torch.Tensor,
    M: torch.Tensor,
    branch_a: torch.Tensor | bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP-style bidirectional mix of labeled image i with unlabeled image i → (x_mix, y_mix).

    Branch a: x_l·M + x_u·(1−M), y·M + Y_u·(1−M); branch b: the reverse. With a 0/1 mask
    these products are exact selections, so `torch.where` gives the reference's values bit
    for bit, and the branch is a device compare (no host sync). `M` is `[*S]` and broadcasts
    over batch and channels.
    """
    branch = torch.as_tensor(branch_a, device=M.device)
    keep_l = (M > 0.5) == branch  # branch a keeps x_l where M = 1, branch b where M = 0
    return torch.where(keep_l, x_l, x_u), torch.where(keep_l, y_l, Y_u)
