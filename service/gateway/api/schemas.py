"""Request and response models of the REST API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

# At least one non-whitespace character: a blank text has nothing to classify (422, like an empty one).
NonEmptyText = Annotated[str, Field(min_length=1, pattern=r"\S")]


class ClassifyRequest(BaseModel):
    """Classify one text (``text``) or several (``texts``); exactly one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "What is the capital of France?"},
                {"texts": ["Who wrote Hamlet?", "How far is the moon?"], "variant": "fp16", "deadline_ms": 500},
            ]
        },
    )

    text: NonEmptyText | None = Field(None, description="One text.")
    texts: list[NonEmptyText] | None = Field(
        None, min_length=1, description="Several texts (at most GATEWAY_MAX_CLIENT_BATCH_SIZE, else 413)."
    )
    variant: str | None = Field(
        None,
        description="Precision variant, e.g. 'int8' or 'fp16'; default GATEWAY_DEFAULT_VARIANT. "
        "An unknown variant gives 422 (error_type 'invalid_input').",
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=3_600_000,
        description="Client deadline in milliseconds from arrival (also header x-deadline-ms; the smaller wins). "
        "Past it the request fails with 504.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' or 'texts'")
        return self


class ClassResult(BaseModel):
    """The answer for one text."""

    label: str = Field(description="The most probable class.")
    score: float = Field(description="Probability of that class.")
    probabilities: dict[str, float] = Field(description="Probability of every class (softmax of the logits).")


class ClassifyResponse(BaseModel):
    """Results in the order of the input texts."""

    variant: str = Field(description="The variant that answered.")
    model: str = Field(description="The Triton model that answered.")
    model_version: str = Field(description="The model version that answered.")
    results: list[ClassResult]


class ServiceTimeInfo(BaseModel):
    """The variant's learned service-time model and what admission does with it."""

    intercept_seconds: float = Field(description="Fixed cost of one batch.")
    per_token_seconds: float = Field(description="Cost of one padded token (batch rows x padded length).")
    samples: int = Field(description="Batches observed so far.")
    ready: bool = Field(description="Whether predictions are used for admission (after a few batches).")
    predicted_drain_seconds: float = Field(description="Predicted time to finish the in-flight and queued work.")
    backend_parallelism: int = Field(
        1, description="Batches the backend runs at once (Triton's instance count, at most the in-flight limit)."
    )
    padding_ratio: float = Field(
        1.0, description="Padded tokens per text token in recent batches; scales the queue's tokens in predictions."
    )
    slo_seconds: float | None = Field(description="The variant's latency target; null admits by deadline only.")
    budget_scale: float = Field(
        1.0,
        description="Share of the SLO budget admission grants now: lowered while admitted requests answer later "
        "than the SLO, raised back while they answer well inside it (docs/reliability.md).",
    )


class ModelInfo(BaseModel):
    """One served variant."""

    variant: str
    model: str = Field(description="Triton model name.")
    version: int = Field(description="Model version requested from Triton (its tokenizer is loaded from it).")
    labels: list[str]
    max_length: int = Field(description="Truncation length in tokens.")
    server_max_batch_size: int | None = Field(description="Triton's max_batch_size for the model.")
    service_time: ServiceTimeInfo | None = Field(None, description="The admission model of the variant.")


class ModelsResponse(BaseModel):
    """The served variants and the batching limits."""

    default_variant: str
    max_batch_size: int = Field(description="Most texts the gateway sends to Triton in one call.")
    max_client_batch_size: int = Field(description="Most texts accepted in one request.")
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    """The single error body of every non-2xx response."""

    error: str = Field(description="Human-readable message; never contains internals.")
    error_type: str = Field(
        description="invalid_input | payload_too_large | overloaded | deadline_exceeded | backend_unavailable | "
        "backend_error | internal | not_found | method_not_allowed | not_ready"
    )


class HealthResponse(BaseModel):
    """Liveness / readiness answer."""

    status: str
