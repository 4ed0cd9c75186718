"""Data: the `Batch` contract, SSL4MIS HDF5 reading, two-stream sampling, GPU augmentation.

Nothing here touches CUDA at import time.
"""
from .augment import AugmentParams, apply_params, augment_2d, draw_params
from .batch import Batch
from .sampler import TwoStreamSampler
from .ssl4mis import (
    LABELED_SLICES,
    DataError,
    SSL4MISDataset,
    cv2_nearest_indices,
    labeled_slice_count,
    resize_nearest,
    slices_of_first_patients,
)
from .stream import TrainStream
from .synthetic import write_synthetic_acdc

__all__ = [
    "LABELED_SLICES",
    "AugmentParams",
    "Batch",
    "DataError",
    "SSL4MISDataset",
    "TrainStream",
    "TwoStreamSampler",
    "apply_params",
    "augment_2d",
    "cv2_nearest_indices",
    "draw_params",
    "labeled_slice_count",
    "resize_nearest",
    "slices_of_first_patients",
    "write_synthetic_acdc",
]
