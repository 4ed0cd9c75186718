"""Data pipelines without a model: samples/s of each backend producing training `Batch`es.

Workloads:
  acdc   the ACDC recipe: HDF5 slices cached at 256x256 (the real subset in ../shared/data/ACDC
         when present, else random slices of that shape), batch 12 labeled + 12 unlabeled,
         the reference augmentations.
  jpeg   a 512x512 RGB JPEG image+mask folder generated in tmp (smooth noise, so the JPEGs have
         a realistic size), trained at 256x256, batch 12 + 12.
  png    CPU decoding of an unlabeled archive: a few hundred 512x512 gray PNGs written once in tmp,
         decoded + resized (OpenCV nearest rule) to 256x256, batches of 12, nothing else timed.
Providers, side by side:
  torch_cache     `TrainStream`: device-resident cache, batched torch augmentation (GPU when
                  present, else CPU) -- the default backend for SSL4MIS / folders
  torch_manifest  jpeg only: labeled from the cache, the 12 unlabeled JPEGs decoded on the CPU
                  per step from a manifest (the CPU-decode path, like a DataLoader)
  dali            `DaliTrainStream`: acdc = external_source of the cache; jpeg = the unlabeled
                  files decoded by `fn.decoders.image` (``mixed`` on a GPU, CPU operators here)
  png providers (the same decoder + resize, `read_unlabeled_image`, in all of them):
    dataloader_w0   the baseline: a plain single-process ``torch.utils.data.DataLoader``
    manifest_wK     `ManifestStream.next_batch(12)` with ``decode_workers`` K = 0, 1, 2
    dataloader_w2   the DataLoader with 2 worker processes
Timed as rounds of back-to-back `stream.next()` calls with one device sync per round (host
clock); extra_info records samples/s (24 / median), batches/s, the card and versions. The png
workload records img/s (``images_per_s``) over rounds of 10 batches, after 6 untimed batches
(the batches a provider queued ahead are used up: steady-state decoding), torch intra-op threads 1
in every provider (collate's ``torch.stack`` with 2 threads on 2 busy cores costs ~5 ms a batch,
which is not decoding). ``python benchmarks/bench_data.py`` prints the png table with the
providers interleaved round by round (fairer on a shared machine).
The issue's bar (GPU): the default backend sustains at
least 3x what the fastest training step consumes. On CPU with ``--benchmark-disable`` every
provider runs once at tiny sizes (32x32, batch 2 + 2) as a smoke test.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_utils when run as a script
from bench_utils import measure  # noqa: E402

from ucseg_fast.data.dali import dali_unavailable_reason
from ucseg_fast.data.factory import ManifestTrainStream, augment_kwargs
from ucseg_fast.data.manifest import ManifestStream
from ucseg_fast.data.stream import TrainStream

ACDC_ROOT = Path(os.environ.get("UCSEG_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")) / "ACDC"
FULL = {"img": (256, 256), "bl": 12, "bu": 12, "jpeg_hw": (512, 512), "n_jpeg": 48, "n_acdc": 256,
        "n_png": 240, "png_batches": 10, "png_rounds": 5, "png_drain": 6}
TINY = {"img": (32, 32), "bl": 2, "bu": 2, "jpeg_hw": (64, 64), "n_jpeg": 6, "n_acdc": 8,
        "n_png": 6, "png_batches": 2, "png_rounds": 1, "png_drain": 1}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def sizes(request) -> dict:
    tiny = not torch.cuda.is_available() and bool(request.config.getoption("benchmark_disable", False))
    return TINY if tiny else FULL


@pytest.fixture(scope="module")
def augment() -> dict:
    from ucseg_fast.config import DataConfig
    return augment_kwargs(DataConfig())


@pytest.fixture(scope="module")
def acdc_cache(sizes) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(images [N,H,W], labels [N,H,W], n_labeled, source) at the benchmark size."""
    size = sizes["img"]
    if (ACDC_ROOT / "train_slices.list").is_file():
        from ucseg_fast.data import SSL4MISDataset
        ds = SSL4MISDataset(ACDC_ROOT)
        names = ds.train_slices[: sizes["n_acdc"]]
        x, y = ds.load_slices(names, size=size)
        return x, y, len(names) // 2, "ACDC subset (HDF5)"
    g = torch.Generator().manual_seed(0)
    n = sizes["n_acdc"]
    return (torch.rand(n, *size, generator=g), torch.randint(0, 4, (n, *size), generator=g,
                                                             dtype=torch.uint8), n // 2, "random")


@pytest.fixture(scope="module")
def jpeg_folder(sizes, tmp_path_factory) -> Path:
    from PIL import Image
    from scipy import ndimage
    root = tmp_path_factory.mktemp("jpeg512")
    rng = np.random.default_rng(0)
    h, w = sizes["jpeg_hw"]
    for split in ("labeled", "unlabeled"):
        (root / split / "image").mkdir(parents=True)
        (root / split / "mask").mkdir(parents=True)
        for i in range(sizes["n_jpeg"]):
            f = ndimage.gaussian_filter(rng.standard_normal((h, w, 3)), sigma=(6, 6, 0))
            img = np.clip(128 + 400 * f, 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(root / split / "image" / f"{i:04d}.jpg", quality=90)
            Image.fromarray(((f[..., 0] > 0) * 255).astype(np.uint8)).save(root / split / "mask" / f"{i:04d}.png")
    return root


def _run(benchmark, provenance, stream, sizes, name: str, workload: str, shapes_c: int) -> None:
    b = stream.next()  # first batch outside the timing (DALI builds its pipeline here)
    bl, bu = sizes["bl"], sizes["bu"]
    assert b.x_l.shape == (bl, shapes_c, *sizes["img"]) and b.x_u.shape == (bu, shapes_c, *sizes["img"])
    assert b.y_l.shape == (bl, *sizes["img"]) and b.x_l.device.type == _device().type

    info = dict(provenance, provider=name, workload=workload, batch=bl + bu, img_size=list(sizes["img"]),
                device=str(_device()))
    # back-to-back batches, one sync per round, host clock (the pipelines mix host and device work)
    median = measure(benchmark, stream.next, info, rounds=10, iterations=5, warmup=2, host_clock=True)
    benchmark.extra_info["samples_per_s"] = (bl + bu) / median
    benchmark.extra_info["batches_per_s"] = 1.0 / median


# ---------------------------------------------------------------------------- ACDC shape
def test_acdc_torch_cache(benchmark, provenance, sizes, augment, acdc_cache):
    x, y, n_l, src = acdc_cache
    s = TrainStream.from_tensors(x, y, n_labeled=n_l, labeled_bs=sizes["bl"], unlabeled_bs=sizes["bu"],
                                 seed=0, device=_device(), augment=augment)
    provenance["data"] = src
    _run(benchmark, provenance, s, sizes, "torch_cache", "acdc", 3)


def test_acdc_dali(benchmark, provenance, sizes, augment, acdc_cache):
    reason = dali_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from ucseg_fast.data.dali import DaliTrainStream
    x, y, n_l, src = acdc_cache
    s = DaliTrainStream(x, y, n_labeled=n_l, labeled_bs=sizes["bl"], unlabeled_bs=sizes["bu"], seed=0,
                        device=_device(), augment=augment)
    provenance["data"] = src
    _run(benchmark, provenance, s, sizes, "dali", "acdc", 3)


# ---------------------------------------------------------------------------- JPEG folder
def _labeled_cache(root: Path, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    from ucseg_fast.data.folders import FolderDataset
    ds = FolderDataset(root, num_classes=2, mask_mode="binary")
    x, y = ds.load_split("labeled", sizes["img"])
    assert y is not None and x.shape[1] == 3
    return x, y


def test_jpeg_torch_cache(benchmark, provenance, sizes, augment, jpeg_folder):
    from ucseg_fast.data.folders import FolderDataset
    x_l, y_l = _labeled_cache(jpeg_folder, sizes)
    x_u, _ = FolderDataset(jpeg_folder, num_classes=2).load_split("unlabeled", sizes["img"], with_labels=False)
    x = torch.cat([x_l, x_u])
    y = torch.cat([y_l, torch.zeros((x_u.shape[0], *sizes["img"]), dtype=y_l.dtype)])
    s = TrainStream.from_tensors(x, y, n_labeled=x_l.shape[0], labeled_bs=sizes["bl"],  # RGB
                                 unlabeled_bs=sizes["bu"], seed=0, device=_device(), augment=augment)
    _run(benchmark, provenance, s, sizes, "torch_cache", "jpeg", 3)


def test_jpeg_torch_manifest_cpu_decode(benchmark, provenance, sizes, augment, jpeg_folder, tmp_path):
    x_l, y_l = _labeled_cache(jpeg_folder, sizes)
    lab = TrainStream.from_tensors(x_l, y_l, n_labeled=x_l.shape[0], labeled_bs=sizes["bl"],
                                   unlabeled_bs=0, seed=0, device=_device(), augment=augment)
    man = tmp_path / "unlabeled.txt"
    man.write_text("".join(f"{p}\n" for p in sorted((jpeg_folder / "unlabeled" / "image").iterdir())))
    ms = ManifestStream(man, size=sizes["img"], channels=3, decode_workers=2)
    s = ManifestTrainStream(lab, ms, sizes["bu"], augment, seed=0, rank=0)
    try:
        _run(benchmark, provenance, s, sizes, "torch_manifest", "jpeg", 3)
    finally:
        s.close()


def test_jpeg_dali_decode(benchmark, provenance, sizes, augment, jpeg_folder):
    reason = dali_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from ucseg_fast.data.dali import DaliTrainStream
    x_l, y_l = _labeled_cache(jpeg_folder, sizes)
    files = sorted((jpeg_folder / "unlabeled" / "image").iterdir())
    s = DaliTrainStream(x_l, y_l, n_labeled=x_l.shape[0], labeled_bs=sizes["bl"], unlabeled_bs=sizes["bu"],
                        seed=0, device=_device(), augment=augment, unlabeled_files=files)
    _run(benchmark, provenance, s, sizes, "dali", "jpeg", 3)


# ---------------------------------------------------------------------------- PNG archive, CPU decode
PNG_PROVIDERS = ("dataloader_w0", "manifest_w0", "manifest_w1", "manifest_w2", "dataloader_w2")


def write_png_archive(root: Path, n: int, hw: tuple[int, int]) -> tuple[list[str], Path]:
    """``n`` gray 8-bit PNGs of smooth noise + grain (realistic compression, ~180 kB at 512²) and
    a manifest naming them; files already there are kept."""
    from PIL import Image
    from scipy import ndimage
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        p = root / f"{i:05d}.png"
        if not p.is_file():
            f = ndimage.gaussian_filter(rng.standard_normal(hw), sigma=4)
            img = np.clip(128 + 600 * f + 6 * rng.standard_normal(hw), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(p)
        files.append(str(p))
    man = root / "manifest.txt"
    man.write_text("".join(f"{f}\n" for f in files))
    return files, man


class _PngDataset(torch.utils.data.Dataset):
    """The baseline's dataset: the stream's own decoder and resize, one file per item."""

    def __init__(self, files: list[str], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from ucseg_fast.data.manifest import read_unlabeled_image
        return torch.from_numpy(read_unlabeled_image(self.files[i], size=self.size))


class _Cycle(torch.utils.data.Sampler):
    """File order, endlessly (the manifest's order)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return (i % self.n for i in itertools.count())

    def __len__(self) -> int:  # pragma: no cover - never asked for an endless sampler
        return 2**62


@contextmanager
def png_provider(name: str, files: list[str], manifest: Path, size: tuple[int, int], batch: int):
    """A ``() -> [batch, H, W]`` tensor callable for one provider (threads/processes cleaned up)."""
    kind, workers = name.rsplit("_w", 1)
    workers = int(workers)
    if kind == "manifest":
        s = ManifestStream(manifest, size=size, decode_workers=workers)
        try:
            yield lambda: torch.from_numpy(s.next_batch(batch))
        finally:
            s.close()
        return
    loader = torch.utils.data.DataLoader(_PngDataset(files, size), batch_size=batch, sampler=_Cycle(len(files)),
                                         num_workers=workers)
    it = iter(loader)
    try:
        yield lambda: next(it)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@contextmanager
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _round(fn: Callable[[], torch.Tensor], batches: int) -> None:
    for _ in range(batches):
        fn()


@pytest.fixture(scope="module")
def png_archive(sizes, tmp_path_factory) -> tuple[list[str], Path]:
    return write_png_archive(tmp_path_factory.mktemp("png512"), sizes["n_png"], sizes["jpeg_hw"])


@pytest.mark.parametrize("provider", PNG_PROVIDERS)
def test_png_decode(benchmark, provenance, sizes, png_archive, provider):
    files, man = png_archive
    batch, img, k = sizes["bu"], sizes["img"], sizes["png_batches"]
    with _one_torch_thread(), png_provider(provider, files, man, img, batch) as fn:
        x = fn()  # worker start-up, first read-ahead
        assert x.shape == (batch, *img) and x.dtype == torch.float32
        _round(fn, sizes["png_drain"])  # steady state: the batches queued ahead are used up
        benchmark.pedantic(_round, args=(fn, k), rounds=sizes["png_rounds"], iterations=1)
    info = dict(provenance, provider=provider, workload="png", batch=batch, img_size=list(img),
                file_size=list(sizes["jpeg_hw"]), files=len(files), batches_per_round=k, torch_threads=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        info.update(images_per_s=k * batch / median, median_round_ms=median * 1e3)
    benchmark.extra_info.update(info)


def png_table(n: int = FULL["n_png"], rounds: int = 5, batches: int = 10, batch: int = 12,
              root: Path | None = None, drain: int = FULL["png_drain"], settle_s: float = 0.5
              ) -> dict[str, list[float]]:
    """img/s per provider, the providers interleaved round by round, torch intra-op threads 1.
    Each provider's round: ``settle_s`` of rest (the previous provider's threads / processes
    refill their queues in the background: not on anyone's clock), ``drain`` untimed batches
    (its own queue, filled during the rest, is used up: steady state), then ``batches`` timed."""
    import tempfile
    root = root or Path(tempfile.gettempdir()) / "ucseg_bench_png512"
    files, man = write_png_archive(root, n, FULL["jpeg_hw"])
    out: dict[str, list[float]] = {p: [] for p in PNG_PROVIDERS}
    with _one_torch_thread():
        from contextlib import ExitStack
        with ExitStack() as stack:
            fns = {p: stack.enter_context(png_provider(p, files, man, FULL["img"], batch)) for p in PNG_PROVIDERS}
            for fn in fns.values():
                fn()  # start-up
            for _ in range(rounds):
                for p, fn in fns.items():
                    time.sleep(settle_s)
                    _round(fn, drain)
                    t = time.perf_counter()
                    _round(fn, batches)
                    out[p].append(batches * batch / (time.perf_counter() - t))
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="img/s of CPU PNG decoding: DataLoader vs ManifestStream")
    ap.add_argument("--files", type=int, default=FULL["n_png"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=10)
    a = ap.parse_args()
    res = png_table(a.files, a.rounds, a.batches)
    base = float(np.median(res["dataloader_w0"]))
    print(f"{a.files} PNGs 512x512 -> 256x256, batch 12, {a.rounds} interleaved rounds of {a.batches} batches, "
          f"{os.cpu_count()} CPUs")
    print(f"{'provider':<16}{'median img/s':>14}{'vs baseline':>13}   rounds")
    for p, v in res.items():
        med = float(np.median(v))
        print(f"{p:<16}{med:>14.0f}{med / base:>12.2f}x   " + " ".join(f"{x:.0f}" for x in v))
