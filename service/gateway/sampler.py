"""Resource gauges sampled in a background thread, off the request path.

Why a thread and not a scrape-time collector: NVML calls and CPU-time deltas need a previous sample and can take
milliseconds on a busy driver; doing them on a timer keeps both ``/metrics`` and the request path free of that
work, and a slow scrape never changes what is measured. The thread only sets gauges; Prometheus reads the last
values.

What is sampled (names in :mod:`service.gateway.metrics`):

* process CPU utilization of the gateway (fraction of one core over the last interval) and the host's CPU
  utilization (fraction of all cores), from ``/proc``;
* per visible NVIDIA GPU: utilization, memory used and memory total, from NVML (``nvidia-ml-py``). Without a GPU,
  the driver library or the package, the GPU series are simply absent; nothing fakes a zero, so "no GPU" and
  "idle GPU" can never be confused on a dashboard or by an autoscaler.

Process resident memory and CPU seconds come from prometheus-client's standard ``ProcessCollector`` (read from
``/proc`` at scrape time, which is cheap), registered next to these gauges.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger("service.gateway")


class _GpuGauges(Protocol):
    def set_gpu(self, index: str, utilization_ratio: float, used_bytes: float, total_bytes: float) -> None: ...

    def set_cpu(self, process_ratio: float | None, host_ratio: float | None) -> None: ...


@dataclass(frozen=True)
class GpuSample:
    """One GPU reading.

    Attributes:
        index: NVML index as a string (the ``gpu`` label).
        utilization_ratio: Fraction of the last sample period a kernel ran (NVML ``gpu`` utilization / 100).
        memory_used_bytes: Device memory in use.
        memory_total_bytes: Device memory size.
    """

    index: str
    utilization_ratio: float
    memory_used_bytes: float
    memory_total_bytes: float


class NvmlReader:
    """Reads every visible GPU through NVML; :meth:`open` returns None where there is no usable GPU."""

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> NvmlReader | None:
        """Initialise NVML and list the GPUs.

        Returns:
            A reader, or None when the package or the driver library is missing, NVML fails, or no GPU is visible.
        """
        try:
            import pynvml  # nvidia-ml-py; optional: the CPU image does not need it
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here  # noqa: BLE001 - any failure here is reported, never fatal
            logger.debug("NVML unavailable: %s", exc)
            return None
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [(str(i), pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as exc:  # noqa: BLE001 - any failure here is reported, never fatal
            logger.warning("NVML initialised but listing GPUs failed: %s", exc)
            pynvml.nvmlShutdown()
            return None
        if not handles:
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles)

    def read(self) -> list[GpuSample]:
        """Return one sample per GPU; a GPU whose query fails is skipped this round (and logged)."""
        samples = []
        for index, handle in self._handles:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # noqa: BLE001 - any failure here is reported, never fatal
                logger.warning("NVML read of GPU %s failed: %s", index, exc)
                continue
            samples.append(GpuSample(index, util.gpu / 100.0, float(mem.used), float(mem.total)))
        return samples

    def close(self) -> None:
        """Shut NVML down."""
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # already shut down or driver gone: nothing to release  # noqa: BLE001, S110 - nothing to release
            pass


def _process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _host_cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(x) for x in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    # guest time is already counted in user/nice; the first 8 fields are the total
    total = sum(values[:8])
    return total - idle, total


class ResourceSampler:
    """Samples CPU (and GPU when present) every ``interval_seconds`` in a daemon thread.

    Args:
        gauges: Receives the values (the application's :class:`GatewayMetrics`).
        interval_seconds: Sampling period.
        gpu_reader: A GPU reader; by default :meth:`NvmlReader.open` decides whether GPU gauges exist.
        enable_gpu: False skips NVML entirely.
    """

    def __init__(
        self,
        gauges: _GpuGauges,
        interval_seconds: float,
        *,
        gpu_reader: NvmlReader | None = None,
        enable_gpu: bool = True,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        self._gauges = gauges
        self._interval = interval_seconds
        self._gpu_reader = gpu_reader
        self._enable_gpu = enable_gpu
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_proc: tuple[float, float] | None = None
        self._last_host: tuple[float, float] | None = None

    @property
    def has_gpu(self) -> bool:
        """Whether GPU gauges are being sampled."""
        return self._gpu_reader is not None

    def start(self) -> None:
        """Take a first sample synchronously (so gauges exist before the first scrape) and start the thread."""
        if self._thread is not None:
            return
        if self._gpu_reader is None and self._enable_gpu:
            self._gpu_reader = NvmlReader.open()
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="gateway-resource-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the thread (bounded wait) and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            self._thread = None
        if self._gpu_reader is not None:
            self._gpu_reader.close()

    def _run(self) -> None:
        # Event.wait doubles as the timer and the stop signal: no sleep-poll, prompt exit.
        while not self._stop.wait(self._interval):
            try:
                self.sample_once()
            except Exception:  # a sampler must never die silently and leave stale gauges behind unexplained
                logger.exception("resource sampling failed")

    def sample_once(self) -> None:
        """Read CPU and GPU once and update the gauges."""
        now = time.monotonic()
        proc = _process_cpu_seconds()
        process_ratio = None
        if self._last_proc is not None and now > self._last_proc[0]:
            process_ratio = max(0.0, (proc - self._last_proc[1]) / (now - self._last_proc[0]))
        self._last_proc = (now, proc)
        host_ratio = None
        host = _host_cpu_times()
        if host is not None:
            if self._last_host is not None and host[1] > self._last_host[1]:
                host_ratio = (host[0] - self._last_host[0]) / (host[1] - self._last_host[1])
                host_ratio = min(1.0, max(0.0, host_ratio))
            self._last_host = host
        self._gauges.set_cpu(process_ratio, host_ratio)
        if self._gpu_reader is not None:
            for s in self._gpu_reader.read():
                self._gauges.set_gpu(s.index, s.utilization_ratio, s.memory_used_bytes, s.memory_total_bytes)
