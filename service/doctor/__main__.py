"""``python -m service.doctor``: is every metric our HPA uses served, and if not, why would scaling stall?"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_SELECTOR = "app.kubernetes.io/name=loraserve"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m service.doctor",
        description="Check a loraserve HorizontalPodAutoscaler against the live cluster: for every metric it scales "
        "on, ask custom.metrics.k8s.io / external.metrics.k8s.io exactly as the HPA controller does, and print what "
        "is served, what is missing and why scaling would silently stall. Exit code 0: all served; 1: something "
        "missing or capped; 2: cannot run (no HPA, no cluster access).",
    )
    parser.add_argument("-n", "--namespace", default="default", help="namespace of the release (default: default)")
    parser.add_argument("--hpa", help="HPA name (default: every HPA matching --selector)")
    parser.add_argument(
        "-l", "--selector", default=DEFAULT_SELECTOR, help=f"label selector of the HPAs (default: {DEFAULT_SELECTOR})"
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None, api_client=None) -> int:
    """Run the doctor.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
        api_client: A ready ``kubernetes.client.ApiClient`` (tests); built from kubeconfig when None.

    Returns:
        The exit code.
    """
    args = build_parser().parse_args(argv)
    try:
        from kubernetes import client, config
    except ImportError:
        print("the doctor needs the kubernetes client: pip install '.[doctor]'", file=sys.stderr)
        return 2
    from service.doctor.doctor import Doctor, DoctorError, report_json, report_text

    if api_client is None:
        try:
            if args.in_cluster:
                config.load_incluster_config()
            else:
                config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        except (config.ConfigException, OSError, ValueError) as exc:  # no/bad kubeconfig: say so, no traceback
            print(f"cannot load Kubernetes configuration: {exc}", file=sys.stderr)
            return 2
        api_client = client.ApiClient()
    doctor = Doctor(api_client)
    try:
        hpas = doctor.find_hpas(args.namespace, args.hpa, args.selector)
        reports = [doctor.check(h) for h in hpas]
    except DoctorError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except client.exceptions.ApiException as exc:
        print(f"Kubernetes API error: HTTP {exc.status} {exc.reason}", file=sys.stderr)
        return 2
    if args.json:
        print(report_json(reports))
    else:
        print("\n\n".join(report_text(r) for r in reports))
    return 0 if all(r.healthy for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
