"""``python -m service.gateway``: load Settings, optionally start the bundled Triton, run uvicorn, drain on SIGTERM.

Shutdown order on SIGTERM/SIGINT: /readyz turns false and new requests get 503 for ``drain_grace_seconds`` (so a
load balancer stops routing here), then the listener closes, accepted requests and queued batches finish (at most
``drain_timeout_seconds``), the batchers and the Triton client stop, and finally the embedded Triton (if any) stops.
A second signal skips the grace period and exits fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from pydantic import BaseModel, ValidationError

from service.gateway.app import create_app
from service.gateway.http_server import http_protocol
from service.gateway.runtime import GatewayRuntime
from service.gateway.settings import Settings

logger = logging.getLogger("service.gateway")


def _env_help(model: type[BaseModel], prefix: str) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(_env_help(ann, f"{prefix}{name.upper()}__"))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        doc = " ".join((field.description or "").split())
        lines.append(f"  {prefix}{name.upper()} (default {default}): {doc}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; its epilog lists every environment variable."""
    parser = argparse.ArgumentParser(
        prog="python -m service.gateway",
        description="Run the loraserve gateway: REST classification with dynamic batching in front of Triton. "
        "Settings come from GATEWAY_* environment variables (listed below); the options override a few of them.",
        epilog="environment variables:\n" + "\n".join(_env_help(Settings, "GATEWAY_")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="bind address (GATEWAY_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port, 0 for a free one (GATEWAY_PORT; default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, help="v2 gRPC port, 0 for a free one, -1 for none (GATEWAY_GRPC_PORT; default 9001)"
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="model repository with tokenizer.json/labels.json per version (GATEWAY_TRITON__MODEL_REPOSITORY)",
    )
    parser.add_argument(
        "--embedded-triton",
        action="store_true",
        help="start the bundled tritonserver (from the nvidia-pytriton wheel) on free 127.0.0.1 ports against the "
        "model repository, loading the classifier variants (and the generator variants when GATEWAY_GENERATE__ENABLED "
        "is on), use its gRPC URL, and stop it after the gateway has drained",
    )
    parser.add_argument("--triton-log", type=Path, help="with --embedded-triton: file for Triton's log")
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (GATEWAY_LOG_LEVEL; default info)",
    )
    return parser


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains before exiting.

    Args:
        config: uvicorn configuration.
        runtime: The gateway runtime (its ``draining`` flag turns /readyz false and refuses new work).
        grace_seconds: How long to keep the listener open, not ready, before closing it.
        on_ready: Called once with the bound URL after start-up.
    """

    def __init__(self, config: uvicorn.Config, runtime: GatewayRuntime, grace_seconds: float, on_ready: Any) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._grace_seconds = grace_seconds
        self._on_ready = on_ready
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recording the signal: uvicorn would re-raise it after shutdown and a re-raised SIGTERM
        # would end the process before the embedded Triton is stopped.
        if self._drain_started:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self._drain_started = True
        self._runtime.draining = True
        logger.info(
            "signal %s: draining (not ready for %.1f s, then finishing accepted work)", sig, self._grace_seconds
        )
        timer = threading.Timer(self._grace_seconds, self._close)
        timer.daemon = True
        timer.start()

    def _close(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: list[Any] | None = None) -> None:
        """Start listening, then report the bound address once."""
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_ready(f"http://{host}:{port}")


def _print_ready(settings: Settings, url: str, grpc_port: int | None) -> None:
    example = json.dumps({"text": "What is the capital of France?", "variant": settings.default_variant})
    lines = [
        f"gateway ready at {url} (docs: {url}/docs)",
        f"  curl -s -X POST {url}/v1/classify -H 'content-type: application/json' -d '{example}'",
    ]
    if settings.generate.enabled:
        body = json.dumps({"prompt": "The capital of France is", "max_new_tokens": 16, "stream": True})
        lines.append(f"  curl -N -s -X POST {url}/v1/generate -H 'content-type: application/json' -d '{body}'")
    if grpc_port is not None:
        lines.append(f"gateway gRPC (v2 GRPCInferenceService, health) at {settings.host}:{grpc_port}")
    print("\n".join(lines), flush=True)


def embedded_models(settings: Settings) -> tuple[str, ...]:
    """The models the embedded Triton loads: the classifier variants, and the generator variants when generation is on.

    Raises:
        ValueError: Generation is on but a generator variant is not published in the model repository (the message
            says how to build it).
    """
    models = [settings.model_name(v) for v in settings.variants]
    g = settings.generate
    if g.enabled:
        repository = Path(settings.triton.model_repository)
        for variant in g.variants:
            name = f"{g.model_name_prefix}_{variant}"
            model_dir = repository / name
            published = (model_dir / "config.pbtxt").is_file() and any(
                p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()
            )
            if not published:
                raise ValueError(
                    f"generation is enabled (GATEWAY_GENERATE__ENABLED) but {name} is not published in {repository}; "
                    "build it with python -m service.modelprep build-generator, or turn generation off"
                )
            models.append(name)
    return tuple(models)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway until a signal drains and stops it.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 after a clean drain, 1 if Triton or the gateway failed to start, 2 for bad
        settings.
    """
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for key in ("host", "port", "grpc_port", "log_level"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        settings = Settings(**overrides)
        if args.model_repository is not None:
            settings = settings.model_copy(
                update={"triton": settings.triton.model_copy(update={"model_repository": args.model_repository})}
            )
    except ValidationError as exc:
        print(f"invalid gateway settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    supervisor = None
    if args.embedded_triton:
        # Imported only here: the gateway image may run without the embedded server's package.
        from service.triton.launcher import TritonLaunchConfig, TritonStartError
        from service.triton.supervisor import TritonSupervisor

        try:
            models = embedded_models(settings)
        except ValueError as exc:
            print(f"cannot start the embedded Triton: {exc}", file=sys.stderr)
            return 1
        cfg = TritonLaunchConfig(
            model_repository=settings.triton.model_repository,
            models=models,
            log_path=args.triton_log,
            startup_timeout_seconds=settings.triton.startup_timeout_seconds,
        )
        supervisor = TritonSupervisor(
            cfg,
            max_backoff_seconds=settings.triton.restart_backoff_max_seconds,
            restart=settings.triton.restart_embedded,
        )
        try:
            triton = supervisor.start()
        except TritonStartError as exc:
            print(f"embedded Triton failed to start: {exc}", file=sys.stderr)
            return 1
        logger.info("embedded Triton ready: grpc %s, http %s (pid %s)", triton.grpc_url, triton.http_url, triton.pid)
        settings = settings.model_copy(
            update={"triton": settings.triton.model_copy(update={"grpc_url": triton.grpc_url})}
        )
    try:
        app = create_app(settings, serve_grpc=True)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=settings.access_log,
            lifespan="on",
            http=http_protocol(),  # one socket write per response (service/gateway/http_server.py)
            timeout_graceful_shutdown=int(max(1, settings.drain_timeout_seconds)),
        )
        server = DrainingServer(
            config,
            app.state.runtime,
            settings.drain_grace_seconds,
            on_ready=lambda url: _print_ready(settings, url, app.state.grpc_port),
        )
        server.run()
        return 0 if server.started else 1
    finally:
        if supervisor is not None:
            supervisor.stop()  # after the gateway drained; no restart can race it


if __name__ == "__main__":
    sys.exit(main())
