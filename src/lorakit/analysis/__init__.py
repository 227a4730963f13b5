"""Analysis of fine-tuned updates: intruder dimensions (arXiv 2410.21228), spectra and effective
rank of each dW, and the norm limits of LoRA gradients (arXiv 2406.03136).

`intruder_dimensions(base_weight, tuned_weight, top_k=10, threshold=0.5)` and the other functions
of `lorakit.analysis.spectral` take tensors; `analyze(source, base, out_dir)` (CLI `lorakit
analyze`) runs them over every layer of an adapter or a fully fine-tuned model and writes a text
report, JSON and spectrum plots.
"""

from lorakit.analysis.report import AnalysisReport, LayerAnalysis, analyse_layer, analyze, format_report, write_report
from lorakit.analysis.spectral import (
    THRESHOLD,
    TOP_K,
    NormBounds,
    effective_rank,
    energy_rank,
    intruder_dimensions,
    intruder_similarities,
    left_singular_vectors,
    norm_bounds,
)

__all__ = [
    "THRESHOLD", "TOP_K", "AnalysisReport", "LayerAnalysis", "NormBounds", "analyse_layer", "analyze",
    "effective_rank", "energy_rank", "format_report", "intruder_dimensions", "intruder_similarities",
    "left_singular_vectors", "norm_bounds", "write_report",
]
