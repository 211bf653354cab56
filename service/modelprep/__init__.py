"""Offline model preparation (needs the `prep` extra: torch, transformers, peft, onnx, onnxruntime)."""
