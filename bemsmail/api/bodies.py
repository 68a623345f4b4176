"""Reading request bodies: content type, size limit, JSON parsing and validation, each with its own problem."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from bemsmail.api.context import MAX_BODY
from bemsmail.api.problems import Problem, from_validation_error

M = TypeVar("M", bound=BaseModel)

JSON_TYPES = ("application/json",)
MERGE_PATCH_TYPES = ("application/merge-patch+json", "application/json")


async def read_model(request: web.Request, model: type[M], content_types: tuple[str, ...] = JSON_TYPES) -> M:
    if request.content_type not in content_types:
        raise Problem(
            415,
            "unsupported-media-type",
            f"send the body as {' or '.join(content_types)} (got {request.content_type or 'nothing'})",
            headers={"Accept-Post" if request.method == "POST" else "Accept-Patch": ", ".join(content_types)},
        )
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "body-too-large", f"the body is {request.content_length} bytes; the limit is {limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "body-too-large", f"the body is over the limit of {limit} bytes") from None
    if not body:
        raise Problem(400, "malformed-json", "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
