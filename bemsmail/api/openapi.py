"""The OpenAPI 3.1 document, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bemsmail import __version__
from bemsmail.api.problems import PROBLEM_CONTENT_TYPE
from bemsmail.api.schemas import (
    Health,
    ProblemDetail,
    RegistrationCreate,
    RegistrationList,
    RegistrationOut,
    RegistrationUpdate,
)

PATH = "/api/v1/openapi.json"
REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "Malformed JSON",
    401: "Missing or invalid credentials",
    403: "The credentials may not act for this mailbox",
    404: "No such registration (or not yours)",
    413: "Body over the size limit",
    415: "Body is not JSON",
    422: "Invalid fields, each named in `errors`",
    503: "Temporarily unable to answer; retry after Retry-After",
}


def _graph_webhook(operation_id: str, what: str) -> dict[str, Any]:
    problems = ((400, "Not JSON, or no 'value' array"), (403, "Source address not in webhook.allowed_networks"),
                (413, "Body over webhook.max_body_bytes"), (415, "Body is not application/json"),
                (503, "Too many notifications queued: Graph redelivers"))
    return {"post": {
        "operationId": operation_id,
        "summary": f"Microsoft Graph posts {what} here; also answers the validation handshake",
        "security": [],
        "parameters": [{"name": "validationToken", "in": "query", "required": False,
                        "description": "Graph's validation handshake: echoed back as text/plain",
                        "schema": {"type": "string"}}],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "required": ["value"],
            "properties": {"value": {"type": "array", "items": {"type": "object"}}}}}}},
        "responses": {
            "200": {"description": "The validation token, decoded", "content": {"text/plain": {
                "schema": {"type": "string"}}}},
            "202": {"description": "Accepted; pushes follow after the answer"},
            **{str(s): {"description": d, "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(ProblemDetail)}}}
               for s, d in problems},
        },
    }}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": _ERRORS[s], "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(ProblemDetail)}}}
        for s in statuses
    }


def _body(model: type[BaseModel], *types: str) -> dict[str, Any]:
    return {"required": True, "content": {t: {"schema": _ref(model)} for t in types}}


ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (RegistrationCreate, RegistrationUpdate)]
        + [(m, "serialization") for m in (RegistrationOut, RegistrationList, ProblemDetail, Health)],
        ref_template=REF,
    )
    secured: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bemsmail API",
            "version": __version__,
            "description": "Device push registrations for the bemsmail mail push relay. "
            "Errors are RFC 9457 problem documents.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "for a trusted front end; may act for any mailbox"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "OIDC access token; may act only for the mailbox in its claim"},
            },
        },
        "paths": {
            "/api/v1/registrations": {
                "post": {
                    "operationId": "upsertRegistration",
                    "summary": "Create or update the registration of (mailbox, device_id)",
                    "security": secured,
                    "requestBody": _body(RegistrationCreate, "application/json"),
                    "responses": {
                        "201": _json(RegistrationOut, "Created") | {
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                        "200": _json(RegistrationOut, "Updated an existing registration"),
                        **_problems(400, 401, 403, 413, 415, 422, 503),
                    },
                },
                "get": {
                    "operationId": "listRegistrations",
                    "summary": "The registrations of one mailbox",
                    "security": secured,
                    "parameters": [{"name": "mailbox", "in": "query", "required": True,
                                    "schema": {"type": "string", "format": "email"}}],
                    "responses": {"200": _json(RegistrationList, "Registrations"), **_problems(401, 403, 422)},
                },
            },
            "/api/v1/registrations/{id}": {
                "parameters": [ID_PARAM],
                "get": {
                    "operationId": "getRegistration",
                    "security": secured,
                    "responses": {"200": _json(RegistrationOut, "The registration"), **_problems(401, 404)},
                },
                "patch": {
                    "operationId": "patchRegistration",
                    "summary": "JSON merge patch (RFC 7396) of token, app, environment, locale, timezone, settings",
                    "security": secured,
                    "requestBody": _body(RegistrationUpdate, "application/merge-patch+json", "application/json"),
                    "responses": {
                        "200": _json(RegistrationOut, "Updated"),
                        **_problems(400, 401, 404, 413, 415, 422, 503),
                    },
                },
                "delete": {
                    "operationId": "deleteRegistration",
                    "security": secured,
                    "responses": {"204": {"description": "Deleted"}, **_problems(401, 404, 503)},
                },
            },
            "/healthz": {"get": {"operationId": "healthz", "security": [],
                                  "responses": {"200": _json(Health, "Alive")}}},
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "security": [],
                    "responses": {"200": _json(Health, "Ready"),
                                  "503": _json(Health, "Not ready: database unreachable or schema not current")},
                }
            },
            "/ews/notification": {
                "post": {
                    "operationId": "ewsSendNotification",
                    "summary": "EWS push mode: Exchange posts SendNotification here (SOAP, not JSON)",
                    "security": [],
                    "parameters": [{"name": "t", "in": "query", "required": True,
                                    "description": "the secret token of the subscribing node",
                                    "schema": {"type": "string"}}],
                    "requestBody": {"required": True,
                                    "content": {"text/xml": {"schema": {"type": "string"}}}},
                    "responses": {
                        "200": {"description": "SendNotificationResult: SubscriptionStatus OK or Unsubscribe",
                                "content": {"text/xml": {"schema": {"type": "string"}}}},
                        **{str(s): {"description": d,
                                    "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(ProblemDetail)}}}
                           for s, d in ((400, "Not a SendNotification envelope"),
                                        (403, "Not one of our subscriptions' callback URLs"),
                                        (413, "Body over the size limit"),
                                        (415, "Body is not text/xml"))},
                    },
                }
            },
            "/notificationClient": _graph_webhook("graphNotifications", "change notifications"),
            "/notificationClient/lifecycle": _graph_webhook("graphLifecycleNotifications",
                                                            "lifecycle notifications"),
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "security": [],
                    "responses": {"200": {"description": "Prometheus text format",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
                }
            },
            PATH: {
                "get": {
                    "operationId": "openapi",
                    "security": [],
                    "responses": {"200": {"description": "This document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            },
        },
    }


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, serve_document, allow_head=False)
