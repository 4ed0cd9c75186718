"""Evaluation: metrics (Dice, Jaccard, HD95, ASD), slice-wise and sliding-window inference,
reports."""
from .inference import (EvaluationResult, evaluate_volumes, predict_volume, save_nifti,
                        zoom_nearest, zoom_order0_indices)
from .metrics import SegmentationMetrics, mean_over_volumes, segmentation_metrics
from .report import (class_names, format_table, save_overlay_figure, write_csv,
                     write_json)
from .sliding_window import (evaluate_cases_3d, predict_case_3d,
                             sliding_window_probability)

__all__ = [
    "EvaluationResult",
    "SegmentationMetrics",
    "class_names",
    "evaluate_cases_3d",
    "evaluate_volumes",
    "format_table",
    "mean_over_volumes",
    "predict_case_3d",
    "predict_volume",
    "save_nifti",
    "save_overlay_figure",
    "segmentation_metrics",
    "sliding_window_probability",
    "write_csv",
    "write_json",
    "zoom_nearest",
    "zoom_order0_indices",
]
