"""The generative model family (issue 17): SmolLM2 from a PyPI package, LoRA, ONNX with a KV cache, Triton serving.

``service.generator`` is offline model preparation (torch, transformers, peft); the Triton model in
``triton_model.py`` imports only numpy and onnxruntime, and the gateway imports neither.
"""
