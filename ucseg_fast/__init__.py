"""ucseg-fast: a fast, faithful training engine and fused GPU ops for UC-Seg."""
__version__ = "0.1.0"
