"""Evaluation: metrics (Dice, Jaccard, HD95, ASD), slice-wise inference, reports."""
from .inference import (EvaluationResult, evaluate_volumes, predict_volume, save_nifti,
                        zoom_nearest, zoom_order0_indices)
from .metrics import SegmentationMetrics, mean_over_volumes, segmentation_metrics
from .report import (class_names, format_table, save_overlay_figure, write_csv,
                     write_json)

__all__ = [
    "EvaluationResult",
    "SegmentationMetrics",
    "class_names",
    "evaluate_volumes",
    "format_table",
    "mean_over_volumes",
    "predict_volume",
    "save_nifti",
    "save_overlay_figure",
    "segmentation_metrics",
    "write_csv",
    "write_json",
    "zoom_nearest",
    "zoom_order0_indices",
]
