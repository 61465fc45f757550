"""grpolab: a reproducible pipeline for GRPO fine-tuning of causal LMs and its research variants."""

__version__ = "0.1.0"
