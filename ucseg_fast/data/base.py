"""The training-stream contract: what every backend (torch, DALI; 2D, 3D; cache, folder,
manifest) gives the trainer, and the parts of it that are the same for all of them.

A stream is an endless, resumable source of `Batch` objects::

    batch = stream.next()            # also next(stream); iter(stream) is stream; never ends
    state = stream.state_dict()      # JSON-serialisable position + RNG state
    other.load_state_dict(state)     # other.next() now returns what stream.next() would
    stream.epoch_length              # floor(n_labeled / labeled_bs), the reference's epoch
    stream.img_size                  # spatial shape of every batch: (H, W) or (X, Y, Z)
    stream.n_labeled                 # labeled items (slices, images, volumes)
    stream.skipped_files             # files skipped so far (0 where nothing can be skipped)
    stream.close()                   # stop decode threads, close files (idempotent)

`Stream` is the abstract base every stream class derives from: it implements iteration, the
defaults above (``epoch_length`` and ``set_identity`` from the stream's `TwoStreamSampler`,
``img_size``, ``skipped_files = 0``, a no-op ``close``, the context-manager protocol), the
construction-time resume identity (`Identity`) and the helpers that save and restore a
``torch.Generator`` in the streams' checkpoint format. A subclass implements what is its own:
``next`` (sampling, decoding, augmentation) and ``state_dict`` / ``load_state_dict``.

`BatchStream` is the same contract as a `typing.Protocol`, for code that accepts any object
with these members (a test double, a wrapper) without requiring the base class.

Contract of ``next``: a `Batch` (``x_l [Bl, C, *S]`` float32, ``y_l [Bl, *S]`` int64,
``x_u [Bu, C, *S]`` float32, ``S = img_size``) on the stream's device, fresh tensors, without a
device-to-host synchronisation where the backend allows it.

Contract of ``state_dict`` / ``load_state_dict``: the state is JSON-serialisable (str, int,
float, bool, None, lists, dicts) and holds the position of the *next* batch ``next`` returns
(batches a stream decoded or prefetched ahead are not counted as consumed) together with every
random generator's state and a content fingerprint of the lists drawn from (`Identity`).
Loading it into a stream built on the same data with the same batch sizes makes the following
batches bit-identical to those the saving stream would have produced (exact resume), whatever
the seed the loading stream was built with. A state that does not fit (another backend's, other
batch sizes, another device type, other data without ``resume_changed_data``) is refused with
an exception before the stream changes. Checkpoints store these states, so their keys are a
file format: a stream may add keys, never drop or rename one it has written.
"""
from __future__ import annotations

import abc
import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .batch import Batch

__all__ = [
    "BatchStream",
    "Identity",
    "Stream",
    "check_generator_device",
    "decode_generator",
    "encode_generator",
    "generator_state",
    "restore_generator",
    "torch_seed",
]


@dataclass(frozen=True)
class Identity:
    """Resume identity given to a stream at construction (`Stream.set_identity`).

    ``labeled`` / ``unlabeled``: content fingerprints (`guards.fingerprint_lines`) of the lists
    the labeled / unlabeled indices stand for; None leaves that part as the stream set it (a
    stream built from a dataset fingerprints its own lists). ``resume_changed_data``
    (``data.resume_changed_data``): continue on changed content instead of refusing it; None
    keeps the default (refuse)."""

    labeled: Mapping[str, Any] | None = None
    unlabeled: Mapping[str, Any] | None = None
    resume_changed_data: bool | None = None


@runtime_checkable
class BatchStream(Protocol):
    """Any object that behaves as a training stream (see the module docstring)."""

    n_labeled: int

    def next(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @property
    def epoch_length(self) -> int: ...

    @property
    def img_size(self) -> tuple[int, ...]: ...


class Stream(abc.ABC):
    """Abstract base of the training streams (the contract: module docstring).

    A subclass calls ``Stream.__init__(self, device=..., img_size=..., n_labeled=...)`` once it
    knows them, sets ``self.sampler`` (its `TwoStreamSampler`) where it has one, and implements
    `next`, `state_dict` and `load_state_dict`. Streams without a sampler of their own (wrappers)
    override `epoch_length` and `set_identity`; streams that skip bad files override
    `skipped_files`; streams holding threads or files override `close`.
    """

    #: files skipped so far (unreadable, too large, not a file); the trainer logs it
    skipped_files: int = 0
    #: the `TwoStreamSampler` that draws the indices (None for a wrapper stream)
    sampler: Any = None

    def __init__(self, *, device: torch.device | str, img_size: tuple[int, ...], n_labeled: int) -> None:
        self.device = torch.device(device)
        self._img_size = tuple(int(s) for s in img_size)
        self.n_labeled = int(n_labeled)

    # ------------------------------------------------------------------ the contract
    @abc.abstractmethod
    def next(self) -> Batch:
        """The next batch (see the module docstring)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next batch `next` returns, RNG states included."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken; refuse a state that does not fit
        before changing anything."""

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    # ------------------------------------------------------------------ properties
    @property
    def epoch_length(self) -> int:
        """Steps per reference epoch, ``floor(n_labeled / labeled_bs)`` (from the sampler; a stream
        without one has no ``epoch_length`` unless it overrides this)."""
        if self.sampler is None:
            raise AttributeError(f"{type(self).__name__} has no sampler: override epoch_length")
        return self.sampler.epoch_length

    @property
    def img_size(self) -> tuple[int, ...]:
        """Spatial shape of every batch: ``(H, W)``, or the 3D patch ``(X, Y, Z)``."""
        return self._img_size

    # ------------------------------------------------------------------ identity
    def set_identity(self, labeled: Mapping[str, Any] | None = None, unlabeled: Mapping[str, Any] | None = None,
                     *, resume_changed_data: bool | None = None) -> None:
        """Content fingerprints of the labeled / unlabeled lists, kept in the state and checked on
        resume (`TwoStreamSampler.set_identity`; None leaves a part as it was)."""
        if self.sampler is None:
            raise NotImplementedError(f"{type(self).__name__} has no sampler: override set_identity")
        self.sampler.set_identity(labeled, unlabeled, resume_changed_data=resume_changed_data)

    def _apply_identity(self, identity: Identity | None) -> None:
        """Construction-time `set_identity` (a subclass calls it once its sampler exists)."""
        if identity is not None:
            self.set_identity(identity.labeled, identity.unlabeled,
                              resume_changed_data=identity.resume_changed_data)

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        """Release threads and files (nothing to release here); safe to call twice."""

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_labeled={self.n_labeled}, img_size={self.img_size}, device={self.device})"


# ---------------------------------------------------------------------------- generators
def torch_seed(seed: int, rank: int) -> int:
    """Seed of a stream's augmentation ``torch.Generator``: independent of the sampler's stream
    (different entropy words), distinct per rank."""
    words = np.random.SeedSequence([int(seed), int(rank), 0x6175_676D]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def encode_generator(generator: torch.Generator) -> str:
    """A ``torch.Generator``'s state as ASCII (base64 of its state bytes)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(generator: torch.Generator, text: str) -> None:
    """Set ``generator`` to a state `encode_generator` wrote."""
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def generator_state(generator: torch.Generator, device: torch.device) -> dict[str, str]:
    """``{"generator", "generator_device"}``: the augmentation generator's state, the format of
    the 2D torch streams' checkpoints."""
    return {"generator": encode_generator(generator), "generator_device": device.type}


def check_generator_device(state: Mapping[str, Any], device: torch.device) -> None:
    """Refuse a `generator_state` saved for another device type (a CUDA generator's state does
    not load into a CPU one)."""
    if state.get("generator_device") != device.type:
        raise ValueError(f"stream state was saved for a {state.get('generator_device')!r} "
                         f"generator, this stream runs on {device.type!r}")


def restore_generator(generator: torch.Generator, state: Mapping[str, Any]) -> None:
    """Set ``generator`` from a `generator_state` (its ``"generator"`` entry)."""
    decode_generator(generator, state["generator"])
