"""Settings from the environment, start-up validation, the error table, and the gateway's import boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.gateway import errors
from service.gateway.api.http_errors import error_response
from service.gateway.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_env_nested_and_lists(monkeypatch):
    monkeypatch.setenv("GATEWAY_PORT", "9123")
    monkeypatch.setenv("GATEWAY_VARIANTS", "int8, fp16")
    monkeypatch.setenv("GATEWAY_DEFAULT_VARIANT", "fp16")
    monkeypatch.setenv("GATEWAY_BATCH__MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("GATEWAY_BATCH__MAX_WAIT_SECONDS", "0.002")
    monkeypatch.setenv("GATEWAY_BATCH__LENGTH_BUCKET_EDGES", "8,16,32")
    monkeypatch.setenv("GATEWAY_TRITON__GRPC_URL", "10.0.0.5:8001")
    monkeypatch.setenv("GATEWAY_TRITON__MODEL_REPOSITORY", "/models")
    s = Settings()
    assert s.port == 9123 and s.variants == ("int8", "fp16") and s.default_variant == "fp16"
    assert s.batch.max_batch_size == 16 and s.batch.max_wait_seconds == 0.002
    assert s.batch.length_bucket_edges == (8, 16, 32)
    assert s.triton.grpc_url == "10.0.0.5:8001" and s.triton.model_repository == Path("/models")
    assert s.model_name("fp16") == "classifier_fp16"


def test_defaults_bind_loopback():
    s = Settings()
    assert s.host == "127.0.0.1" and s.triton.model_repository == Path("model_repository")


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("GATEWAY_BATCH__MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("GATEWAY_BATCH__MAX_WAIT_SECONDS", "-1", "max_wait_seconds"),
        ("GATEWAY_DEFAULT_VARIANT", "fp32", "'fp32'"),
        ("GATEWAY_TRITON__GRPC_URL", "http://x:1", "'http://x:1'"),
        ("GATEWAY_BATCH__LENGTH_BUCKET_EDGES", "32,16", "(32, 16)"),
        ("GATEWAY_VARIANTS", "INT8", "'INT8'"),
        ("GATEWAY_MAX_CLIENT_BATCH_SIZE", "100000", "max_client_batch_size"),
    ],
)
def test_bad_values_fail_at_startup_naming_them(monkeypatch, env, value, needle):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert needle in str(info.value)


def test_client_batch_larger_than_queue_is_refused():
    with pytest.raises(ValidationError, match=r"max_client_batch_size \(100\) > batch.max_queue_size \(50\)"):
        Settings(max_client_batch_size=100, batch={"max_queue_size": 50})


def test_unknown_setting_is_refused():
    with pytest.raises(ValidationError):
        Settings(batch={"max_batch": 3})


def test_every_setting_is_documented():
    def check(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"

    from service.gateway.settings import BatchSettings, TritonSettings

    for model in (Settings, BatchSettings, TritonSettings):
        check(model)


def test_error_table_matches_the_documented_statuses():
    # One table by construction: every class carries (HTTP status, error_type, gRPC status) as class attributes.
    assert {cls.__name__: row for cls, row in errors.ERROR_TABLE.items()} == {
        "InvalidInput": (422, "invalid_input", "INVALID_ARGUMENT"),
        "PayloadTooLarge": (413, "payload_too_large", "INVALID_ARGUMENT"),
        "Overloaded": (429, "overloaded", "RESOURCE_EXHAUSTED"),
        "DeadlineExceeded": (504, "deadline_exceeded", "DEADLINE_EXCEEDED"),
        "BackendUnavailable": (503, "backend_unavailable", "UNAVAILABLE"),
        "NotReady": (503, "not_ready", "UNAVAILABLE"),
        "BackendError": (502, "backend_error", "INTERNAL"),
        "Internal": (500, "internal", "INTERNAL"),
        "ModelNotFound": (404, "not_found", "NOT_FOUND"),
        "Unauthenticated": (401, "unauthenticated", "UNAUTHENTICATED"),
        "PermissionDenied": (403, "forbidden", "PERMISSION_DENIED"),
        "ClientClosedRequest": (499, "client_closed_request", "CANCELLED"),
    }
    assert len({t for _, t, _ in errors.ERROR_TABLE.values()}) == len(errors.ERROR_TABLE)
    # Every ServiceError subclass defined in the module is in the table (no error outside it).
    defined = {
        obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.ServiceError)
    } - {errors.ServiceError}
    assert defined == set(errors.ERROR_TABLE)
    exc = errors.Overloaded("full", retry_after_seconds=4)
    assert error_response(exc).headers["retry-after"] == "4"


def test_batching_errors_and_backend_import_no_web_or_rpc_framework():
    # The batching core and the error hierarchy must stay importable without fastapi/starlette/grpc; the backend
    # may pull grpc only through the Triton client.
    code = (
        "import sys\n"
        "import service.gateway.batching.batcher, service.gateway.batching.policy, service.gateway.batching.queue\n"
        "import service.gateway.errors, service.gateway.model, service.triton.repository\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'grpc', 'uvicorn', 'pydantic'})\n"
        "assert not bad, bad\n"
        "import service.gateway.backend.triton\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_gateway_never_imports_modelprep_torch_or_transformers():
    code = (
        "import sys\n"
        "import service.gateway.app, service.gateway.__main__, service.gateway.backend.triton\n"
        "from service.gateway.app import create_app\n"
        "from service.gateway.settings import Settings\n"
        "create_app(Settings())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft') "
        "or m.startswith('service.modelprep'))\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BAD []" in proc.stdout
