"""loraserve: fine-tune, optimize and serve a transformer text classifier.

Packages:
    service.modelprep  offline: data -> LoRA fine-tune -> merge -> ONNX FP32/FP16/INT8 -> report -> publish (torch).
    service.triton     the embedded Triton launcher and the python-backend model code (no torch).
    service.gateway    the online FastAPI gateway in front of Triton (no torch; never imports modelprep).
"""

__version__ = "0.1.0"
