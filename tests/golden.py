"""Access to the golden vectors computed by the reference implementation.

`tests/golden/` holds a JSON file and a safetensors file (see its README.md); $UCSEG_GOLDEN
names another folder with the same two files (a regenerated set, say) to use instead. This module
regenerates the large inputs bit for bit (the splitmix64 generator below), computes probes and
compares values with the tolerance classes the JSON names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

VENDORED_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FILES = ("ucseg2d_golden.json", "ucseg2d_golden.safetensors")


def _golden_dir() -> Path:
    """$UCSEG_GOLDEN when set (it must hold the file pair: an override that names nothing is an
    error, never a silent fall-back), else the vendored copy."""
    override = os.environ.get("UCSEG_GOLDEN")
    if not override:
        return VENDORED_DIR
    missing = [f for f in GOLDEN_FILES if not (Path(override) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"UCSEG_GOLDEN={override} does not hold {' and '.join(missing)} "
                                f"(unset it to use the vendored vectors in {VENDORED_DIR})")
    return Path(override)


GOLDEN_DIR = _golden_dir()

GOLD, MIX1, MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                    np.uint64(0x94D049BB133111EB))


def gen_bits(seed: int, n: int) -> np.ndarray:
    x = (np.uint64(seed) << np.uint64(32)) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x * GOLD
        x = x ^ (x >> np.uint64(30)); x = x * MIX1
        x = x ^ (x >> np.uint64(27)); x = x * MIX2
    return x ^ (x >> np.uint64(31))


def gen_u(seed: int, shape, lo: float, span: float) -> np.ndarray:
    k = (gen_bits(seed, int(np.prod(shape))) >> np.uint64(40)).astype(np.float64)
    return (lo + k * (span / 2**24)).reshape(shape)


def gen_w(seed: int, shape, center: float, half: float) -> np.ndarray:
    k = (gen_bits(seed, int(np.prod(shape))) >> np.uint64(54)).astype(np.float64)
    return (center + half * ((k - 512.0) / 512.0)).reshape(shape)


def disc_map(params, H: int = 256, W: int = 256) -> np.ndarray:
    out = np.zeros((len(params), H, W), np.int64)
    h = np.arange(H)[:, None]; w = np.arange(W)[None, :]
    for b, (cy, cx, r_lv, r_myo, ry, rx, r_rv) in enumerate(params):
        dc = (h - cy) ** 2 + (w - cx) ** 2; dr = (h - ry) ** 2 + (w - rx) ** 2
        m = np.zeros((H, W), np.int64)
        m[dr <= r_rv ** 2] = 1; m[dc <= r_myo ** 2] = 2; m[dc <= r_lv ** 2] = 3
        out[b] = m
    return out


def one_hot(class_map, num_classes: int = 4) -> torch.Tensor:
    """float64 [B, C, H, W] one-hot of an integer map [B, H, W]."""
    m = torch.as_tensor(np.asarray(class_map), dtype=torch.int64)
    return torch.nn.functional.one_hot(m, num_classes).permute(0, 3, 1, 2).to(torch.float64)


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


class Golden:
    """The golden file pair. `g.tensor(k)`, `g.scalar(k)`, `g.input(k)`, `g.check(k, x, tol)`."""

    def __init__(self, root: Path = GOLDEN_DIR):
        from safetensors.torch import load_file
        self.root = Path(root)
        self.meta = json.loads((self.root / "ucseg2d_golden.json").read_text())
        self.tensors = load_file(str(self.root / "ucseg2d_golden.safetensors"))
        self.scalars = self.meta["scalars"]
        self.probes = self.meta["probes"]
        self.inputs = self.meta["inputs"]

    # ----- access -------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        return t.to(torch.float64) if t.dtype in (torch.float16, torch.float32) else t

    def scalar(self, key: str):
        return self.scalars[key]

    def input(self, key: str, y: torch.Tensor | None = None) -> torch.Tensor:
        """Regenerate a large input from its recipe (float64). `y`: one-hot labels for the
        item-7 logit formulas."""
        spec = self.inputs[key]
        r, shape = spec["recipe"], spec["shape"]
        if "gen_u" in r:
            x = t64(gen_u(r["gen_u"][0], shape, r["gen_u"][1], r["gen_u"][2]))
        elif "offset" in r:
            o, n = r["offset"], r["noise"]
            x = t64(gen_u(o["gen_u"][0], o["shape"], o["gen_u"][1], o["gen_u"][2])) + \
                t64(gen_u(n["gen_u"][0], n["shape"], n["gen_u"][1], n["gen_u"][2]))
        elif "mean" in r:
            m, n = r["mean"], r["noise"]
            x = t64(gen_u(m["gen_u"][0], m["shape"], m["gen_u"][1], m["gen_u"][2])) + \
                t64(gen_u(n["gen_u"][0], n["shape"], n["gen_u"][1], n["gen_u"][2]))
        else:
            x = self._logit_formula(r["formula"], shape, y)
        chk = spec.get("check")
        if chk is not None:
            flat = x.flatten()
            assert flat[:4].tolist() == chk["first"], f"generator mismatch for {key}"
        return x

    @staticmethod
    def _logit_formula(formula: str, shape, y):
        # "a*y[:n] + gen_u(s, shape, -2, 4) + 8*[gen_u(sm, [B,1,H,W], 0, 1) < 1/32] *
        #  one_hot(floor(gen_u(sc, [B,1,H,W], 0, 4)))"
        import re
        assert y is not None, "this input needs the one-hot labels y"
        a = float(formula.split("*")[0])
        n = int(re.search(r"y\[:(\d+)\]", formula).group(1))
        seeds = [int(s) for s in re.findall(r"gen_u\((\d+),", formula)]
        B, C, H, W = shape
        base = t64(gen_u(seeds[0], shape, -2, 4))
        spike = t64(gen_u(seeds[1], [B, 1, H, W], 0, 1)) < 1 / 32
        cls = torch.floor(t64(gen_u(seeds[2], [B, 1, H, W], 0, 4))).long()[:, 0]
        oh = torch.nn.functional.one_hot(cls, C).permute(0, 3, 1, 2).to(torch.float64)
        return a * y[:n].to(torch.float64) + base + 8.0 * spike.to(torch.float64) * oh

    # ----- comparison ---------------------------------------------------------------------
    @staticmethod
    def _rule(tol: str):
        return {"f64": (1e-10, 1e-12), "f64g": (1e-8, 1e-9), "f32": (2e-6, 1e-6)}[tol]

    def _close(self, key, a, b, tol, S=None):
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        assert a.shape == b.shape, f"{key}: shape {tuple(a.shape)} != golden {tuple(b.shape)}"
        if tol == "exact":
            assert torch.equal(a, b), f"{key}: not exactly equal"
            return
        if tol == "loose":
            bound = 1e-5 * b.abs() + 1e-6
        else:
            rel, ab = self._rule(tol)
            S = float(b.abs().max()) if S is None else S
            bound = rel * b.abs() + ab * S
        err = (a - b).abs()
        bad = err > bound
        assert not bool(torch.isnan(a).any()), f"{key}: NaN"
        assert not bool(bad.any()), (
            f"{key} ({tol}): {int(bad.sum())}/{bad.numel()} out of tolerance; max err "
            f"{float(err.max()):.3e}, worst golden {float(b.flatten()[int((err - bound).argmax())]):.6g}")

    def check(self, key: str, x, tol: str):
        """Compare `x` with the golden value stored under `key`, whichever form it has."""
        if key in self.tensors:
            self._close(key, x, self.tensor(key), tol)
        elif key in self.probes:
            self.check_probe(key, x, tol)
        elif key in self.scalars:
            self._close(key, torch.as_tensor(x, dtype=torch.float64),
                        torch.as_tensor(self.scalars[key], dtype=torch.float64), tol)
        else:
            raise KeyError(key)

    def check_probe(self, key: str, x, tol: str):
        p = self.probes[key]
        x = torch.as_tensor(x)
        assert list(x.shape) == p["shape"], f"{key}: shape {list(x.shape)} != {p['shape']}"
        if "counts" in p:  # integer class map
            m = x.to(torch.int64)
            counts = [[int((m[b] == c).sum()) for c in range(len(p["counts"][0]))]
                      for b in range(m.shape[0])]
            assert counts == p["counts"], f"{key}: class counts {counts} != {p['counts']}"
            idx = torch.arange(m.numel(), dtype=torch.int64) % 65521
            assert int((m.flatten() * idx).sum()) == p["idx_sum"], f"{key}: idx_sum differs"
            return
        x = x.to(torch.float64)
        flat = x.flatten()
        r = t64(gen_u(999, list(x.shape), -1, 2)).flatten()
        S = p["abs_sum"]
        self._close(key + ".sum", flat.sum(), p["sum"], tol, S=S)
        self._close(key + ".wsum", (flat * r).sum(), p["wsum"], tol, S=S)
        rel = {"f64": 1e-10, "f64g": 1e-8, "f32": 2e-6, "loose": 1e-5}.get(tol, 1e-10)
        sumsq = float((flat * flat).sum())
        assert abs(sumsq - p["sumsq"]) <= rel * abs(p["sumsq"]) + 1e-300, \
            f"{key}.sumsq: {sumsq} != {p['sumsq']}"
        for suffix in ("crop", "bcsum", "rowsum", "colsum"):
            k = f"{key}.{suffix}"
            if k not in self.tensors:
                continue
            if suffix == "crop":
                v = x[..., 120:136, 120:136]
            elif suffix == "bcsum":
                v = x.reshape(x.shape[0], x.shape[1], -1).sum(-1)
            else:
                x2 = x.reshape(-1, x.shape[-1])
                v = x2.sum(-1) if suffix == "rowsum" else x2.sum(0)
            # crops compare element-wise with S = probe abs max; sums with S = probe abs_sum
            self._close(k, v, self.tensor(k), tol, S=p["max_abs"] if suffix == "crop" else S)

    def check_zero(self, key: str, x, weight_probe_key: str):
        S = self.probes[weight_probe_key]["max_abs"] if weight_probe_key in self.probes \
            else float(self.tensor(weight_probe_key).abs().max())
        m = float(torch.as_tensor(x, dtype=torch.float64).abs().max())
        assert m <= 1e-10 * S, f"{key}: |x|max {m} > 1e-10*{S}"


_CACHE: dict = {}


def golden() -> Golden:
    missing = [f for f in GOLDEN_FILES if not (GOLDEN_DIR / f).is_file()]
    if missing:  # part of the repository: a missing file is a broken checkout, never a skip
        pytest.fail(f"golden vectors missing: {', '.join(str(GOLDEN_DIR / f) for f in missing)}")
    if "g" not in _CACHE:
        _CACHE["g"] = Golden()
    return _CACHE["g"]


def test_generator_check_vectors():
    g = golden()
    cv = g.meta["generator"]["check_vectors"]
    assert [hex(int(v)) for v in gen_bits(1, 2)] == cv["bits(1,[2])"]
    assert gen_u(1, [4], 0, 1).tolist() == cv["gen_u(1,[4],0,1)"]
    assert gen_w(1, [4], 0, 1).tolist() == cv["gen_w(1,[4],0,1)"]
