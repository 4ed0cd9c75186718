"""Data: the `Batch` contract, the `Stream` contract every training stream implements (`base`),
SSL4MIS HDF5 reading (2D slices, 3D volumes), two-stream sampling, GPU augmentation, the 2D and
3D streams (`factory.build_train_stream` picks one); `errors` (`DataError`), `guards` (path
checks, the pixel cap, resume identity) and `prefetch` (ordered decoding threads).

Nothing here touches CUDA at import time.
"""
from .augment import AugmentParams, apply_params, augment_2d, draw_params
from .augment3d import RotFlipCrop, draw_rot_flip_crop, rot_flip_crop
from .base import BatchStream, Identity, Stream
from .batch import Batch
from .errors import DataError, DataPathError
from .sampler import TwoStreamSampler
from .ssl4mis import (
    LABELED_SLICES,
    SSL4MISDataset,
    cv2_nearest_indices,
    labeled_slice_count,
    resize_nearest,
    slices_of_first_patients,
)
from .stream import TrainStream
from .stream3d import VolumeStream
from .synthetic import write_synthetic_acdc
from .volumes import VolumeDataset, VolumeNotFoundError

__all__ = [
    "LABELED_SLICES",
    "AugmentParams",
    "Batch",
    "BatchStream",
    "DataError",
    "DataPathError",
    "Identity",
    "RotFlipCrop",
    "SSL4MISDataset",
    "Stream",
    "TrainStream",
    "TwoStreamSampler",
    "VolumeDataset",
    "VolumeNotFoundError",
    "VolumeStream",
    "apply_params",
    "augment_2d",
    "cv2_nearest_indices",
    "draw_params",
    "draw_rot_flip_crop",
    "labeled_slice_count",
    "resize_nearest",
    "rot_flip_crop",
    "slices_of_first_patients",
    "write_synthetic_acdc",
]
