"""Offline model preparation (needs the `prep` extra: torch, transformers, peft, onnx, onnxruntime)."""

import os as _os


def _passive_openmp_when_oversubscribed() -> None:
    """Let idle OpenMP threads sleep instead of spinning when the machine is already busier than its cores.

    Measured on a shared 2-core VM at load ~15: a LoRA training step of MiniLM took 11-19 s with torch's 2 spinning
    OpenMP threads, 2.4-3 s with 1 thread, and 1.1-1.3 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``. It has to
    be set before torch starts its OpenMP runtime, so here, on the package's first import; an explicit setting wins.
    """
    try:
        busy = _os.getloadavg()[0] > (_os.cpu_count() or 1)
    except OSError:
        busy = False
    if busy:
        _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_passive_openmp_when_oversubscribed()
