"""``python -m service.triton``: run the embedded tritonserver in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from service.triton.launcher import TritonLaunchConfig, TritonServer, TritonStartError
from service.triton.model_config import ModelConfigError, load_and_validate

# Triton's usual ports, so a gateway with default settings finds it.
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
# Liveness check interval while waiting for a signal; a crashed server ends the CLI within this time.
WATCH_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m service.triton",
        description=(
            "Start NVIDIA Triton Inference Server (the binary from the nvidia-pytriton wheel, or "
            "$LORASERVE_TRITONSERVER) on 127.0.0.1 against a model repository, wait until it is ready, print "
            "its addresses, and keep it running until SIGINT (Ctrl-C) or SIGTERM, which drain it gracefully."
        ),
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        required=True,
        help="directory holding <model>/config.pbtxt and <model>/<version>/ (see docs/model_repository.md)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        default=None,
        help="load only these models (Triton explicit model-control mode); default: every model in the repository",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help=f"HTTP (KServe v2) port on 127.0.0.1; 0 picks a free port (default {DEFAULT_HTTP_PORT})",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help=f"gRPC port on 127.0.0.1; 0 picks a free port (default {DEFAULT_GRPC_PORT})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port on 127.0.0.1; 0 picks a free port (default {DEFAULT_METRICS_PORT})",
    )
    parser.add_argument(
        "--log-path",
        type=Path,
        default=None,
        help="server log file (appended to); default: a new temporary file, whose path is printed",
    )
    parser.add_argument(
        "--startup-timeout-seconds",
        type=float,
        default=120.0,
        help="how long to wait for /v2/health/ready before giving up (default 120)",
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip checking each config.pbtxt against the model repository contract before start",
    )
    parser.add_argument(
        "extra_args",
        nargs=argparse.REMAINDER,
        metavar="-- TRITON_ARGS",
        help="anything after '--' is passed to tritonserver unchanged, e.g. -- --log-verbose=1",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments without the program name; ``None`` uses ``sys.argv``.

    Returns:
        The process exit code: 0 after a clean stop, 1 if the server failed to start or died, 2 for a bad
        model repository.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = tuple(a for a in args.extra_args if a != "--")
    if not args.no_validate:
        try:
            names = args.models or sorted(p.parent.name for p in args.model_repository.glob("*/config.pbtxt"))
            for name in names:
                load_and_validate(args.model_repository / name)
        except ModelConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    server = TritonServer(
        TritonLaunchConfig(
            model_repository=args.model_repository,
            models=tuple(args.models) if args.models else None,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_path=args.log_path,
            startup_timeout_seconds=args.startup_timeout_seconds,
            extra_args=extra,
        )
    )
    try:
        server.start()
    except TritonStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        print(f"tritonserver ready (pid {server.pid})", flush=True)
        print(f"  http    {server.http_url}\n  grpc    {server.grpc_url}\n  metrics {server.metrics_url}")
        print(f"  log     {server.log_path}", flush=True)
        while not stop_requested.wait(WATCH_SECONDS):
            if not server.is_alive():
                print(f"error: tritonserver died\n{server.log_tail()}", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
