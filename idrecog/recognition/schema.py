"""OpenAPI description of ``POST /recognize``: the multipart form and the answer (pydantic models).

The handler parses the form itself (limits, authentication and the body timeout come before any parsing), so
the request schema is given to FastAPI as ``openapi_extra``; the response models are the documented shape of
the JSON the handler returns, and ``tests/test_serve.py`` validates real answers against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Reason(BaseModel):
    """A rule that did not hold."""

    rule: str
    task: str
    field: str
    value: Any = Field(None, description="the task output's value (null when the task did not run)")
    expected: str = Field(description="operator and threshold, e.g. '>= 0.8'")
    outcome: Literal["review", "reject"]
    note: str | None = None


class Skipped(BaseModel):
    rule: str
    task: str
    why: str


class Recognition(BaseModel):
    """The decision of the rule file over the task outputs."""

    decision: Literal["accept", "review", "reject"]
    reasons: list[Reason] = Field(description="every failed rule, in file order")
    passed: list[str]
    skipped: list[Skipped]


class ResolvedTasks(BaseModel):
    resolved: list[str] = Field(description="the tasks that apply to this document")
    how: str = Field(description="how they were chosen, e.g. 'doc_type given'")


class Timing(BaseModel):
    model_ms: float = Field(description="milliseconds of the forward pass this request was part of")
    batch_size: float = Field(description="requests in that forward pass")
    server_ms: float = Field(description="milliseconds from arrival to answer inside the server")


class RecognizeResponse(BaseModel):
    """The recognize object (as ``idrecog recognize`` prints it) plus the request id and timing."""

    request_id: str = Field(description="also in the X-Request-ID header and the audit log")
    id: str = Field(description="the form's `id`, else the request id")
    tasks: ResolvedTasks
    doc_type: str | None
    outputs: dict[str, dict[str, Any]] = Field(description="post-processed output of each resolved task")
    withheld: dict[str, Any]
    routing: dict[str, Any] | None = None
    recognition: Recognition | None = Field(description="null when the server runs without rules")
    timing: Timing


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line naming the field or limit")
    request_id: str | None = None


def recognize_request_body(doc_types: list[str], max_angles: int, max_field_bytes: int) -> dict[str, Any]:
    """``openapi_extra`` of the endpoint: its multipart/form-data request body."""

    def binary(desc: str) -> dict[str, Any]:
        return {"type": "string", "format": "binary", "description": desc}

    doc_type: dict[str, Any] = {
        "type": "string",
        "description": "known document type (skips doc-type resolution)",
    }
    if doc_types:
        doc_type["enum"] = doc_types
    schema = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": binary("the document image (PNG, JPEG or WEBP)"),
            "flash": binary("flash frame of the same capture"),
            "angles": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "maxItems": max_angles,
                "description": "angle frames of the same capture (repeat the field)",
            },
            "user": {
                "type": "string",
                "maxLength": max_field_bytes,
                "description": "JSON object {attributes, behaviour} about the user (personal data, not stored)",
            },
            "doc_type": doc_type,
            "id": {"type": "string", "description": "the client's id of the document, echoed as `id`"},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }
