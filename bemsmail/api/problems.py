"""RFC 9457 problem documents: the only shape an API error ever takes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from pydantic import ValidationError

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "urn:bemsmail:problem:"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    field: str
    message: str


@dataclass
class Problem(Exception):
    """Raise anywhere in a handler; the error middleware renders it."""

    status: int
    slug: str
    detail: str
    errors: list[FieldProblem] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.slug}: {self.detail}"

    def to_response(self, request_id: str | None = None) -> web.Response:
        body: dict[str, object] = {
            "type": TYPE_BASE + self.slug,
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        if request_id:
            body["request_id"] = request_id
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith("function-"):
            out += f".{part}" if out else part
    return out or "(body)"


def from_validation_error(exc: ValidationError, prefix: str = "") -> Problem:
    """422 naming every bad field. Input values are never echoed: they may be tokens."""
    errors = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        if err["type"] == "json_invalid":
            reason = err["msg"].removeprefix("Invalid JSON: ")
            return Problem(400, "malformed-json", f"body is not valid JSON: {reason}")
        message = err["msg"].removeprefix("Value error, ")
        errors.append(FieldProblem(field_path(err["loc"], prefix), message))
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return Problem(422, "invalid-fields", detail, errors)


def from_http_exception(exc: web.HTTPException) -> Problem:
    slug = {
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
        415: "unsupported-media-type",
    }.get(exc.status, "http-error")
    detail = {
        404: "no such resource",
        405: "this method is not allowed on this resource",
        413: "the request body is larger than this server accepts",
    }.get(exc.status, exc.reason)
    headers = {}
    if exc.status == 405 and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return Problem(exc.status, slug, detail, headers=headers)
