"""Flywheel: continuous-feedback LoRA fine-tuning daemon."""

__version__ = "0.1.0"
