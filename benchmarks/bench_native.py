"""Connected components + per-class largest-component filter (the nms=1 pseudo-label rule).

Workloads (realistic masks: pseudo-labels of a partly trained model = smooth class fields with
boundary noise and speckle, so many small components beside the big ones):
  acdc2d  12 x 256 x 256, 4 classes (one unlabeled half-batch of the ACDC recipe)
  la3d     2 x 96 x 96 x 96, 2 classes (3D recipe)
Providers, side by side:
  native      libucseg_native CUDA kernels (block union-find)           [CUDA]
  triton      ops/cc_triton.py: the same union-find as Triton kernels, fixed launches and no
              host sync (the path of a plain `pip install` with Triton)  [CUDA]
  torch       pure-PyTorch label propagation fallback                   [CUDA]
  reference   the authors' path: GPU -> .cpu().numpy() -> skimage.measure.label per image and
              class -> largest by bincount -> back to the GPU             [CUDA, or CPU only]
  scipy       this package's CPU path (scipy.ndimage)                    [CPU tensors]
The reference calls the filter 3x per phase-1 step (Y_u and the IFE masks of z1, z2); the bar is
3 native (or Triton) calls <= 1 ms on an H100/H200 (`test_step_largest_component` times exactly
those three calls). On CPU (`--benchmark-disable`) only the CPU providers
run, once each.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_utils import sync

from ucseg_fast.bench.targets import cc_labels
from ucseg_fast.ops import components as cc

WORKLOADS = {"acdc2d": ((12, 256, 256), 4), "la3d": ((2, 96, 96, 96), 2)}


def pseudo_labels(shape, C: int, seed: int = 0) -> torch.Tensor:
    """Class map of a partly trained model (the report's target builder)."""
    return cc_labels(shape, C, seed)


def reference_largest_component(labels_gpu: torch.Tensor, C: int) -> torch.Tensor:
    """What the reference does per step (docs/method.md §6.4, §6.6 row 18), copies included."""
    from skimage.measure import label
    lab = labels_gpu.cpu().numpy()
    out = np.zeros_like(lab)
    for b in range(lab.shape[0]):
        for c in range(1, C):
            cc_map = label(lab[b] == c, connectivity=lab.ndim - 1)
            if cc_map.max() == 0:
                continue
            keep = np.argmax(np.bincount(cc_map.ravel())[1:]) + 1
            out[b][cc_map == keep] = c
    return torch.from_numpy(out).to(labels_gpu.device)


def reference_cc(labels_gpu: torch.Tensor) -> torch.Tensor:
    """skimage labelling of the foreground per image, with the copies of the reference."""
    from skimage.measure import label
    m = (labels_gpu > 0).cpu().numpy()
    out = np.stack([label(m[b], connectivity=m.ndim - 1) for b in range(m.shape[0])])
    return torch.from_numpy(out).to(labels_gpu.device)


def _providers():
    cuda = torch.cuda.is_available()
    return [
        pytest.param("native", marks=pytest.mark.skipif(not cuda, reason="needs CUDA")),
        pytest.param("triton", marks=pytest.mark.skipif(not cuda, reason="needs CUDA")),
        pytest.param("torch", marks=pytest.mark.skipif(not cuda, reason="needs CUDA")),
        "reference",
        pytest.param("scipy", marks=pytest.mark.skipif(cuda, reason="CPU provider")),
    ]


def _fn(provider: str, op: str, C: int):
    if op == "cc":
        return {"native": lambda x: cc.connected_components(x > 0),
                "triton": lambda x: cc.connected_components_triton(x > 0),
                "torch": lambda x: cc.connected_components_torch(x > 0),
                "scipy": lambda x: cc.connected_components_scipy(x > 0),
                "reference": reference_cc}[provider]
    return {"native": lambda x: cc.largest_component(x, C),
            "triton": lambda x: cc.largest_component_triton(x, C),
            "torch": lambda x: cc.largest_component_torch(x, C),
            "scipy": lambda x: cc.largest_component_scipy(x, C),
            "reference": lambda x: reference_largest_component(x, C)}[provider]


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("op", ["largest_component", "cc"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_native_components(benchmark, provenance, workload, op, provider):
    shape, C = WORKLOADS[workload]
    if provider == "native":
        from ucseg_fast import native
        lib = native.load()
        if lib is None or not lib.has_cuda:
            pytest.skip(native.unavailable_reason() or "library built without CUDA")
    if provider == "triton":
        from ucseg_fast.ops import cc_triton
        if not cc_triton.HAS_TRITON:
            pytest.skip("triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    labels = pseudo_labels(shape, C).to(device)
    fn = _fn(provider, op, C)

    def target():
        out = fn(labels)
        sync()
        return out

    out = target()  # warm-up (and the correctness check below)
    if op == "largest_component":
        assert torch.equal(out.cpu(), cc.largest_component_scipy(labels.cpu(), C))
    elif provider in ("native", "triton", "torch", "scipy"):  # canonical ids on every backend
        assert torch.equal(out.cpu(), cc.connected_components_scipy(labels.cpu() > 0))
    slow = provider in ("reference", "scipy")
    benchmark.extra_info.update(provenance)
    benchmark.extra_info.update(workload=workload, shape=list(shape), classes=C, op=op,
                                provider=provider, pixels=int(labels.numel()))
    if provider == "triton":
        from ucseg_fast.ops import cc_triton
        benchmark.extra_info["launches"] = cc_triton.launches(
            "largest_component" if op == "largest_component" else "connected_components")
    benchmark.pedantic(target, rounds=3 if slow else 50, warmup_rounds=0 if slow else 5,
                       iterations=1)


# ---------------------------------------------------------------------------------------------
# the three filter calls of one ACDC phase-1 step (the <= 1 ms bar)
# ---------------------------------------------------------------------------------------------
STEP_SHAPES = [(12, 256, 256), (24, 256, 256), (24, 256, 256)]  # Y_u, IFE masks of z1 and z2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("provider", ["native", "triton", "triton-graph", "torch"])
def test_step_largest_component(benchmark, provenance, provider):
    """3 largest_component calls at the ACDC step shapes, 4 classes. triton-graph replays the
    three Triton calls from one captured CUDA graph (possible because they never sync)."""
    C = 4
    if provider == "native":
        from ucseg_fast import native
        lib = native.load()
        if lib is None or not lib.has_cuda:
            pytest.skip(native.unavailable_reason() or "library built without CUDA")
        fn = lambda x: cc.largest_component(x, C)  # noqa: E731
    elif provider.startswith("triton"):
        from ucseg_fast.ops import cc_triton
        if not cc_triton.HAS_TRITON:
            pytest.skip("triton is not installed")
        fn = lambda x: cc.largest_component_triton(x, C)  # noqa: E731
    else:
        fn = lambda x: cc.largest_component_torch(x, C)  # noqa: E731
    inputs = [pseudo_labels(s, C, seed=i).cuda() for i, s in enumerate(STEP_SHAPES)]

    def calls():
        return [fn(x) for x in inputs]

    outs = calls()  # warm-up: compiles the kernels
    for x, o in zip(inputs, outs):
        assert torch.equal(o.cpu(), cc.largest_component_scipy(x.cpu(), C))
    if provider == "triton-graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            calls()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = calls()
        graph.replay()
        sync()
        for x, o in zip(inputs, outs):
            assert torch.equal(o.cpu(), cc.largest_component_scipy(x.cpu(), C))

        def target():
            graph.replay()
            sync()
    else:
        def target():
            calls()
            sync()

    benchmark.extra_info.update(provenance)
    benchmark.extra_info.update(workload="acdc_step_filter", shapes=[list(s) for s in STEP_SHAPES],
                                classes=C, op="largest_component x3", provider=provider,
                                pixels=int(sum(x.numel() for x in inputs)))
    benchmark.pedantic(target, rounds=50, warmup_rounds=5, iterations=1)


# ---------------------------------------------------------------------------------------------
# HD95 + ASD of one 3D volume: GPU exact surface distances vs medpy (the reference's metrics)
# ---------------------------------------------------------------------------------------------
def volume_pair(shape, seed: int = 0):
    """GT = smooth blob (an atrium-sized object); prediction = GT with a shifted boundary, a
    false-positive island and speckle: the typical error pattern of a 3D model."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=6.0)
    x /= x.std()
    gt = x > 0.8
    y = x + 0.3 * ndimage.gaussian_filter(rng.standard_normal(shape), sigma=3.0) / 0.05
    pred = (y > 0.8) ^ (rng.random(shape) < 0.001)
    return pred, gt


def _medpy_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("medpy") is not None


@pytest.mark.parametrize("provider", [
    pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    "scipy",
    pytest.param("medpy", marks=pytest.mark.skipif(not _medpy_installed(), reason="medpy not installed"))])
def test_hd95_asd_volume(benchmark, provenance, provider):
    """gpu: eval.surface_gpu; scipy: eval.metrics' CPU path (medpy's algorithm, cropped);
    medpy: medpy.metric.binary hd95 + asd, as the reference calls them."""
    from ucseg_fast.eval import metrics
    shape = (112, 112, 80) if torch.cuda.is_available() else (40, 40, 32)
    pred, gt = volume_pair(shape)

    def from_distances(d_pg, d_gp):
        return float(np.percentile(np.hstack((d_pg, d_gp)), 95)), float(d_pg.mean())

    if provider == "medpy":
        from medpy.metric import binary

        def target():
            return binary.hd95(pred, gt), binary.asd(pred, gt)
    elif provider == "scipy":
        scipy_fn = metrics._surface_distances

        def target():
            return from_distances(*scipy_fn(pred, gt, None))
    else:
        from ucseg_fast.eval.surface_gpu import surface_distances

        def target():
            return from_distances(*surface_distances(pred, gt, None, device="cuda"))
    hd, asd = target()
    want_hd, want_asd = from_distances(*metrics._surface_distances(pred, gt, None))
    assert abs(hd - want_hd) <= 1e-4 and abs(asd - want_asd) <= 1e-4
    benchmark.extra_info.update(provenance)
    benchmark.extra_info.update(workload="hd95_asd_3d", shape=list(shape), op="hd95+asd",
                                provider=provider, pixels=int(np.prod(shape)))
    slow = provider != "gpu"
    benchmark.pedantic(target, rounds=3 if slow else 20, iterations=1, warmup_rounds=0 if slow else 2)
