"""Diagnose an HPA's metrics through the Kubernetes API (the kubernetes Python client).

What a stalled HPA looks like from the outside: replicas never change, and the only trace is a condition
``ScalingActive=False`` with "unable to get metric ..." — the most common autoscaling failure users report
(triton#6247, #3897). This module asks the same APIs the HPA controller asks, for the same objects:

1. the HPA(s) of the release (by name or by label selector) and the pod selector of their scale target;
2. the ``APIService`` registrations of ``custom.metrics.k8s.io`` / ``external.metrics.k8s.io`` (is an adapter
   installed and available?) and their discovery lists (which metric names does it serve?);
3. per HPA metric, the exact metrics API read the controller performs (``pods/*/<metric>`` with the pod
   selector, ``<kind>/<name>/<metric>`` for Object metrics, the external metric with its selector), classifying
   the answer as served, missing (404 / not discovered), empty (served but no series for these pods), partial
   (fewer pods than running) or invalid (NaN);
4. the HPA's own conditions (``ScalingActive``, ``ScalingLimited``) and current metrics.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

CUSTOM_GROUP = "custom.metrics.k8s.io"
EXTERNAL_GROUP = "external.metrics.k8s.io"
METRICS_VERSION = "v1beta1"
#: Kind of a describedObject -> resource name in the custom metrics API path.
_RESOURCE_OF_KIND = {
    "Service": "services",
    "Pod": "pods",
    "Deployment": "deployments",
    "Ingress": "ingresses",
    "Namespace": "namespaces",
    "StatefulSet": "statefulsets",
}


@dataclass
class MetricCheck:
    """The verdict on one HPA metric.

    Attributes:
        type: HPA metric type (Pods, Object, External, Resource, ContainerResource).
        name: Metric name.
        status: served | missing | empty | partial | invalid | skipped.
        detail: What was found (values, counts) or why it is not served.
        target: The HPA target, as written in the HPA.
        values: The values the metrics API returned (by object name), for served metrics.
    """

    type: str
    name: str
    status: str
    detail: str
    target: str = ""
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class HpaReport:
    """Everything found for one HPA."""

    namespace: str
    name: str
    target: str
    min_replicas: int
    max_replicas: int
    current_replicas: int | None
    desired_replicas: int | None
    running_pods: int
    api_services: dict[str, str]
    metrics: list[MetricCheck]
    conditions: list[str]
    stall_reasons: list[str]

    @property
    def healthy(self) -> bool:
        """True when every metric is served and nothing stalls scaling."""
        return not self.stall_reasons


class DoctorError(RuntimeError):
    """The doctor cannot run (no HPA found, no access); the message says what to do."""


def _quantity(value: str) -> float:
    """Parse a Kubernetes quantity as the metrics APIs return it ("250m", "16", "1k", "NaN")."""
    suffixes = {
        "n": 1e-9,
        "u": 1e-6,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).lstrip("-").isdigit():
            return float(value[: -len(suffix)]) * suffixes[suffix]
    return float(value)


def _selector_string(match_labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((match_labels or {}).items()))


def _target_text(target: Any) -> str:
    if target is None:
        return ""
    for attr in ("average_value", "value", "average_utilization"):
        v = getattr(target, attr, None)
        if v is not None:
            return f"{target.type} {v}"
    return str(target.type)


class Doctor:
    """Runs the checks with one configured ``kubernetes.client.ApiClient``.

    Args:
        api_client: A configured client (from kubeconfig or in-cluster config).
    """

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client
        self.autoscaling = client.AutoscalingV2Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.registration = client.ApiregistrationV1Api(api_client)

    # -- raw reads of the aggregated metrics APIs (no typed client exists for them) ---------------------------

    def _get(self, path: str, query: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """GET an API path; return (HTTP status, decoded body). Non-2xx answers are returned, not raised."""
        params = self.api.param_serialize(
            "GET",
            path,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*params)
            response.read()
            status, raw = response.status, response.data
        except ApiException as exc:
            status, raw = exc.status, exc.body
        try:
            body = json.loads(raw) if raw else {}
        except (TypeError, ValueError):
            body = {"message": str(raw)[:300]}
        return status, body

    def _api_service(self, group: str) -> str:
        """'available', 'missing' or 'unavailable: <reason>' for the APIService of a metrics group."""
        try:
            svc = self.registration.read_api_service(f"{METRICS_VERSION}.{group}")
        except ApiException as exc:
            if exc.status == 404:
                return "missing"
            return f"unreadable: HTTP {exc.status}"
        backend = f"{svc.spec.service.namespace}/{svc.spec.service.name}" if svc.spec.service else "local"
        for cond in (svc.status.conditions if svc.status else None) or []:
            if cond.type == "Available":
                if cond.status == "True":
                    return f"available ({backend})"
                return f"unavailable ({backend}): {cond.reason}: {cond.message}"
        return f"unknown ({backend}): no Available condition"

    def _discovered(self, group: str) -> set[str] | None:
        status, body = self._get(f"/apis/{group}/{METRICS_VERSION}")
        if status != 200:
            return None
        return {r["name"] for r in body.get("resources", [])}

    # -- the checks ---------------------------------------------------------------------------------------------

    def find_hpas(self, namespace: str, name: str | None, label_selector: str) -> list[Any]:
        """Return the HPA named ``name``, or every HPA matching ``label_selector``.

        Raises:
            DoctorError: When none is found.
        """
        if name:
            try:
                return [self.autoscaling.read_namespaced_horizontal_pod_autoscaler(name, namespace)]
            except ApiException as exc:
                if exc.status == 404:
                    raise DoctorError(f"no HorizontalPodAutoscaler {name!r} in namespace {namespace!r}") from None
                raise DoctorError(f"reading HPA {namespace}/{name}: HTTP {exc.status} {exc.reason}") from None
        found = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace, label_selector=label_selector)
        if not found.items:
            raise DoctorError(
                f"no HorizontalPodAutoscaler with labels {label_selector!r} in namespace {namespace!r} "
                "(is autoscaling.enabled set, or does KEDA own the HPA? try --hpa NAME)"
            )
        return list(found.items)

    def check(self, hpa: Any) -> HpaReport:
        """Diagnose one HPA.

        Args:
            hpa: A ``V2HorizontalPodAutoscaler``.

        Returns:
            The report.
        """
        ns = hpa.metadata.namespace
        ref = hpa.spec.scale_target_ref
        selector = ""
        running = 0
        reasons: list[str] = []
        try:
            if ref.kind == "Deployment":
                dep = self.apps.read_namespaced_deployment(ref.name, ns)
                selector = _selector_string(dep.spec.selector.match_labels)
                pods = self.core.list_namespaced_pod(ns, label_selector=selector)
                running = sum(1 for p in pods.items if p.status and p.status.phase == "Running")
        except ApiException as exc:
            reasons.append(f"scale target {ref.kind}/{ref.name}: HTTP {exc.status} {exc.reason}")
        api_services = {g: self._api_service(g) for g in (CUSTOM_GROUP, EXTERNAL_GROUP)}
        discovered = {
            g: self._discovered(g) for g in (CUSTOM_GROUP, EXTERNAL_GROUP) if api_services[g].startswith("available")
        }

        checks = [
            self._check_metric(m, ns, selector, running, api_services, discovered) for m in hpa.spec.metrics or []
        ]
        for c in checks:
            if c.status in ("missing", "empty", "invalid"):
                reasons.append(f"{c.type} metric {c.name}: {c.detail}")
        conditions = []
        status = hpa.status
        for cond in (status.conditions if status else None) or []:
            conditions.append(f"{cond.type}={cond.status} ({cond.reason}): {cond.message}")
            if cond.type == "ScalingActive" and cond.status == "False":
                reasons.append(f"the HPA itself reports ScalingActive=False ({cond.reason}): {cond.message}")
            if cond.type == "AbleToScale" and cond.status == "False":
                reasons.append(f"the HPA cannot scale ({cond.reason}): {cond.message}")
        if status and status.current_replicas is not None and status.current_replicas >= hpa.spec.max_replicas:
            reasons.append(f"at maxReplicas ({hpa.spec.max_replicas}): it cannot add pods however high the metrics")
        return HpaReport(
            namespace=ns,
            name=hpa.metadata.name,
            target=f"{ref.kind}/{ref.name}",
            min_replicas=hpa.spec.min_replicas or 1,
            max_replicas=hpa.spec.max_replicas,
            current_replicas=status.current_replicas if status else None,
            desired_replicas=status.desired_replicas if status else None,
            running_pods=running,
            api_services=api_services,
            metrics=checks,
            conditions=conditions,
            stall_reasons=reasons,
        )

    def _check_metric(
        self,
        metric: Any,
        ns: str,
        pod_selector: str,
        running: int,
        api_services: dict[str, str],
        discovered: dict[str, set[str] | None],
    ) -> MetricCheck:
        kind = metric.type
        if kind in ("Resource", "ContainerResource"):
            res = metric.resource or metric.container_resource
            return MetricCheck(
                kind,
                res.name,
                "skipped",
                "served by metrics.k8s.io (metrics-server), not checked",
                _target_text(res.target),
            )
        if kind == "Pods":
            spec = metric.pods
            group, resource = CUSTOM_GROUP, f"pods/{spec.metric.name}"
            path = f"/apis/{CUSTOM_GROUP}/{METRICS_VERSION}/namespaces/{ns}/pods/*/{spec.metric.name}"
            selector = pod_selector
        elif kind == "Object":
            spec = metric.object
            obj = spec.described_object
            plural = _RESOURCE_OF_KIND.get(obj.kind, obj.kind.lower() + "s")
            group, resource = CUSTOM_GROUP, f"{plural}/{spec.metric.name}"
            path = f"/apis/{CUSTOM_GROUP}/{METRICS_VERSION}/namespaces/{ns}/{plural}/{obj.name}/{spec.metric.name}"
            selector = ""
        elif kind == "External":
            spec = metric.external
            group, resource = EXTERNAL_GROUP, spec.metric.name
            path = f"/apis/{EXTERNAL_GROUP}/{METRICS_VERSION}/namespaces/{ns}/{spec.metric.name}"
            sel = spec.metric.selector
            selector = _selector_string(sel.match_labels) if sel else ""
        else:
            return MetricCheck(kind, "?", "skipped", f"unknown metric type {kind}")
        name, target = spec.metric.name, _target_text(spec.target)
        if not api_services[group].startswith("available"):
            return MetricCheck(
                kind,
                name,
                "missing",
                f"the {group} API is {api_services[group]}: no adapter "
                "(prometheus-adapter or KEDA) serves it, so the HPA gets 'no metrics returned'",
                target,
            )
        served_names = discovered.get(group)
        query = {"labelSelector": selector} if selector else {}
        status, body = self._get(path, query)
        if status == 404 or (
            status == 200 and served_names is not None and resource not in served_names and kind != "External"
        ):
            hint = (
                ""
                if served_names is None
                else (f"; the adapter serves: {', '.join(sorted(served_names)) or 'nothing'}")
            )
            return MetricCheck(
                kind,
                name,
                "missing",
                f"not served ({body.get('message', 'HTTP 404')}): no adapter rule exposes {resource}{hint}",
                target,
            )
        if status != 200:
            return MetricCheck(kind, name, "missing", f"HTTP {status}: {body.get('message', '')}", target)
        items = body.get("items", [])
        if not items:
            where = f"pods matching {selector!r}" if kind == "Pods" else "this object"
            return MetricCheck(
                kind,
                name,
                "empty",
                f"the adapter knows {resource} but returned no value for {where}: "
                "the series lacks the namespace/pod (or service) labels, is not scraped, or has no "
                "samples in the query window",
                target,
            )
        values = {
            (i.get("describedObject", {}).get("name") or i.get("metricName", name)): str(i["value"]) for i in items
        }
        numbers = {k: _quantity(v) for k, v in values.items()}
        bad = [k for k, v in numbers.items() if math.isnan(v) or math.isinf(v)]
        if bad:
            return MetricCheck(
                kind,
                name,
                "invalid",
                f"non-finite value for {', '.join(bad)} (a histogram_quantile "
                "over no traffic gives NaN; guard the query)",
                target,
                values,
            )
        if kind == "Pods" and running and len(items) < running:
            return MetricCheck(
                kind,
                name,
                "partial",
                f"{len(items)} of {running} running pods have a value; the HPA "
                "assumes conservative values for the others",
                target,
                values,
            )
        avg = sum(numbers.values()) / len(numbers)
        return MetricCheck(kind, name, "served", f"{len(items)} value(s), mean {avg:g}", target, values)


def report_text(report: HpaReport) -> str:
    """Human-readable report."""
    lines = [
        (
            f"HPA {report.namespace}/{report.name} -> {report.target}: replicas {report.current_replicas} "
            f"(desired {report.desired_replicas}, min {report.min_replicas}, max {report.max_replicas}), "
            f"{report.running_pods} running pod(s)"
        ),
    ]
    for group, state in report.api_services.items():
        lines.append(f"  {group}: {state}")
    lines.append("  metrics:")
    for m in report.metrics:
        lines.append(f"    [{m.status.upper():8}] {m.type:8} {m.name}  target {m.target or '-'}: {m.detail}")
    if report.conditions:
        lines.append("  conditions:")
        lines += [f"    {c}" for c in report.conditions]
    if report.stall_reasons:
        lines.append("  scaling would stall or is capped because:")
        lines += [f"    - {r}" for r in report.stall_reasons]
    else:
        lines.append("  OK: every metric is served; the HPA can act on all of them.")
    return "\n".join(lines)


def report_json(reports: list[HpaReport]) -> str:
    """Machine-readable reports."""
    return json.dumps([{**asdict(r), "healthy": r.healthy} for r in reports], indent=2)


def quote_selector(selector: str) -> str:
    """URL-quote a label selector (for messages showing the equivalent kubectl get --raw call)."""
    return urllib.parse.quote(selector, safe="")
