"""Embedded NVIDIA Triton Inference Server: launcher and python-backend model code (no torch)."""
