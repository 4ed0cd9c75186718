"""Two-stream (labeled + unlabeled) batch sampling with SSL4MIS semantics and exact resume.

SSL4MIS ``TwoStreamBatchSampler`` (docs/method.md §3): every "epoch" draws one permutation of the
labeled indices and cuts it into groups of ``labeled_bs`` (an incomplete last group is dropped);
each group is paired with the next ``unlabeled_bs`` indices of an endless chain of fresh
permutations of the unlabeled indices, and that chain restarts (its leftover is discarded) at
every epoch. Random draws happen in the same order as there: the labeled permutation at the
start of the epoch, unlabeled permutations lazily when the chain runs dry.

Resume identity: `set_identity` gives the sampler a content fingerprint of the lists its labeled
and unlabeled indices stand for (slice names, file names: `guards.fingerprint_lines`); `state_dict`
stores it and `load_state_dict` refuses a state taken on other content (a reordered
``train_slices.list`` of the same length included) with a `DataError` naming the list, unless
``resume_changed_data``: then it continues on the new lists from the saved epoch and position
(clamped to the new epoch length), with a logged warning. States without a fingerprint (older
checkpoints, bare samplers) are checked by their counts, as before.

Differences from the reference (deliberate): the permutations come from a private
``numpy.random.Generator(PCG64)`` instead of the global numpy RNG (so nothing else in the
process shifts the sequence), and the sampler is an infinite iterator over epochs (the trainer
stops at ``max_iterations``; the reference overshoots to the end of the last epoch).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .guards import check_same_content, content_changed

__all__ = ["TwoStreamSampler"]

_STATE_VERSION = 1
_PARTS = ("labeled", "unlabeled")
log = logging.getLogger(__name__)


class TwoStreamSampler:
    """Infinite iterator of ``(labeled_idx [labeled_bs], unlabeled_idx [unlabeled_bs])`` int64 arrays.

    Args:
        labeled_idx, unlabeled_idx: disjoint dataset indices.
        labeled_bs, unlabeled_bs: indices per batch from each stream (``unlabeled_bs`` may be 0).
        seed: seeds the private PCG64 generator.
        rank, world_size: data-parallel replicas. Each rank seeds its generator from
            ``SeedSequence(seed, spawn_key=(rank,))`` so ranks draw independent batches (every rank
            sees a full epoch of its own; this is not a partition of the data). With
            ``world_size == 1`` the stream is ``SeedSequence(seed)``.
    """

    def __init__(
        self,
        labeled_idx: Sequence[int] | np.ndarray,
        unlabeled_idx: Sequence[int] | np.ndarray,
        labeled_bs: int,
        unlabeled_bs: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._labeled = np.asarray(labeled_idx, dtype=np.int64).reshape(-1)
        self._unlabeled = np.asarray(unlabeled_idx, dtype=np.int64).reshape(-1)
        if labeled_bs < 1:
            raise ValueError(f"labeled_bs must be >= 1, got {labeled_bs}")
        if unlabeled_bs < 0:
            raise ValueError(f"unlabeled_bs must be >= 0, got {unlabeled_bs}")
        if len(self._labeled) < labeled_bs:
            raise ValueError(
                f"{len(self._labeled)} labeled indices cannot fill one batch of labeled_bs={labeled_bs}"
            )
        if unlabeled_bs > 0 and len(self._unlabeled) == 0:
            raise ValueError(f"unlabeled_bs={unlabeled_bs} but there are no unlabeled indices")
        if len(np.unique(self._labeled)) != len(self._labeled):
            raise ValueError("labeled indices contain duplicates")
        if len(np.unique(self._unlabeled)) != len(self._unlabeled):
            raise ValueError("unlabeled indices contain duplicates")
        overlap = np.intersect1d(self._labeled, self._unlabeled)
        if overlap.size:
            raise ValueError(f"labeled and unlabeled indices overlap, e.g. index {int(overlap[0])}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.labeled_bs = int(labeled_bs)
        self.unlabeled_bs = int(unlabeled_bs)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        ss = (
            np.random.SeedSequence(self.seed)
            if world_size == 1
            else np.random.SeedSequence(self.seed, spawn_key=(self.rank,))
        )
        self._rng = np.random.Generator(np.random.PCG64(ss))
        self._identity: dict[str, dict[str, Any]] = {}
        self.resume_changed_data = False
        self._epoch = 0
        self._position = 0  # batches already drawn in the current epoch
        self._start_epoch()

    # ------------------------------------------------------------------ identity
    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Content fingerprints (`guards.fingerprint_lines`) of the lists the labeled / unlabeled
        indices stand for, stored in `state_dict` and checked by `load_state_dict`; None leaves
        that part unchecked. ``resume_changed_data`` (``data.resume_changed_data``): continue on
        changed content instead of refusing it."""
        for part, fp in (("labeled", labeled), ("unlabeled", unlabeled)):
            if fp is not None:
                self._identity[part] = {k: fp[k] for k in ("source", "lines", "sha256")}
        if resume_changed_data is not None:
            self.resume_changed_data = bool(resume_changed_data)

    @property
    def identity(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._identity)

    # ------------------------------------------------------------------ sampling
    @property
    def epoch_length(self) -> int:
        """Batches per epoch, ``floor(n_labeled / labeled_bs)`` (the reference's ``len(loader)``)."""
        return len(self._labeled) // self.labeled_bs

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def _start_epoch(self) -> None:
        self._epoch_rng_state = copy.deepcopy(self._rng.bit_generator.state)
        self._labeled_perm = self._rng.permutation(self._labeled)
        self._unlabeled_perm = self._unlabeled[:0]
        self._unlabeled_pos = 0

    def _take_unlabeled(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            if self._unlabeled_pos == len(self._unlabeled_perm):
                self._unlabeled_perm = self._rng.permutation(self._unlabeled)
                self._unlabeled_pos = 0
            take = min(n - filled, len(self._unlabeled_perm) - self._unlabeled_pos)
            out[filled:filled + take] = self._unlabeled_perm[self._unlabeled_pos:self._unlabeled_pos + take]
            self._unlabeled_pos += take
            filled += take
        return out

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        if self._position == self.epoch_length:
            self._epoch += 1
            self._position = 0
            self._start_epoch()
        start = self._position * self.labeled_bs
        labeled = self._labeled_perm[start:start + self.labeled_bs].copy()
        unlabeled = self._take_unlabeled(self.unlabeled_bs)
        self._position += 1
        return labeled, unlabeled

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self._draw()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: generator state at the epoch start + batches drawn since."""
        state = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_labeled": int(len(self._labeled)),
            "n_unlabeled": int(len(self._unlabeled)),
            "labeled_bs": self.labeled_bs,
            "unlabeled_bs": self.unlabeled_bs,
            "epoch": self._epoch,
            "position": self._position,
            "epoch_rng_state": copy.deepcopy(self._epoch_rng_state),
        }
        if self._identity:
            state["content"] = copy.deepcopy(self._identity)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken (replays the current epoch's draws).

        Refuses (`DataError`, one line naming the list) a state whose content fingerprint differs
        from this sampler's, unless ``resume_changed_data``; then the epoch's permutation is
        redrawn over the new lists from the saved generator state and the saved position is
        clamped to the new epoch length. Without fingerprints on both sides: counts checked."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} != {_STATE_VERSION}")
        saved = state.get("content") or {}
        changed = [p for p in _PARTS if content_changed(saved.get(p), self._identity.get(p))]
        where = f"the saved position (epoch {int(state['epoch'])}, batch {int(state['position'])})"
        for part in changed:  # raises unless resume_changed_data (then logs a warning)
            check_same_content(saved[part], self._identity[part], resume_changed_data=self.resume_changed_data,
                               position=where)
        checks = [("labeled_bs", self.labeled_bs), ("unlabeled_bs", self.unlabeled_bs)]
        if not changed:
            checks = [("n_labeled", len(self._labeled)), ("n_unlabeled", len(self._unlabeled)), *checks]
        for key, mine in checks:
            if int(state[key]) != mine:
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {mine}")
        position = int(state["position"])
        if changed:
            position = min(max(position, 0), self.epoch_length)
        if not 0 <= position <= self.epoch_length:
            raise ValueError(f"sampler state position {position} outside [0, {self.epoch_length}]")
        self._rng.bit_generator.state = copy.deepcopy(state["epoch_rng_state"])
        self._epoch = int(state["epoch"])
        self._position = 0
        self._start_epoch()
        for _ in range(position):  # cheap: permutations of at most a few thousand indices
            self._draw()
