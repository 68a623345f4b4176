"""The registration endpoints: upsert, list by mailbox, read, merge-patch and delete one registration."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from bemsmail.api.bodies import MERGE_PATCH_TYPES, read_model
from bemsmail.api.context import METRICS, SERVICE, principal
from bemsmail.api.problems import FieldProblem, Problem, from_validation_error
from bemsmail.api.schemas import (
    Mailbox,
    RegistrationCreate,
    RegistrationList,
    RegistrationOut,
    RegistrationUpdate,
    check_token,
)
from bemsmail.core.model import DeviceSettings, Registration, RegistrationInput
from bemsmail.core.registrations import RegistrationRejected
from bemsmail.store.sql import StoreConflict

PREFIX = "/api/v1"
MAILBOX = TypeAdapter(Mailbox)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=model.model_dump_json().encode(), content_type="application/json", headers=headers
    )


def _rejected(exc: RegistrationRejected) -> Problem:
    return Problem(422, "invalid-fields", f"{exc.field}: {exc.message}", [FieldProblem(exc.field, exc.message)])


def _forbidden() -> Problem:
    return Problem(403, "wrong-mailbox", "these credentials may not act for this mailbox")


def _busy() -> Problem:
    return Problem(503, "busy", "the store is busy with conflicting writes; retry", headers={"Retry-After": "1"})


async def _owned(request: web.Request) -> Registration:
    """The registration named in the path, if the caller may see it; another mailbox's is a 404, not a 403,
    so ids cannot be probed for existence."""
    found = await request.app[SERVICE].get(request.match_info["id"])
    if found is None or not principal(request).may_act_for(found.mailbox):
        raise Problem(404, "not-found", "no registration with this id")
    return found


async def upsert(request: web.Request) -> web.Response:
    body = await read_model(request, RegistrationCreate)
    if not principal(request).may_act_for(body.mailbox):
        raise _forbidden()
    data = RegistrationInput(
        mailbox=body.mailbox,
        device_id=body.device_id,
        platform=body.platform,
        token=body.token,
        app_id=body.app_id,
        environment=body.environment,
        locale=body.locale,
        timezone=body.timezone,
        settings=body.settings,
    )
    try:
        result = await request.app[SERVICE].register(data)
    except RegistrationRejected as exc:
        raise _rejected(exc) from None
    except StoreConflict:
        raise _busy() from None
    metrics = request.app[METRICS]
    metrics.registration_changed("created" if result.created else "updated")
    if result.displaced:
        metrics.registration_changed("moved", len(result.displaced))
    out = RegistrationOut.of(result.registration)
    if result.created:
        return _json(out, 201, {"Location": f"{PREFIX}/registrations/{out.id}"})
    return _json(out)


async def list_for_mailbox(request: web.Request) -> web.Response:
    raw = request.query.get("mailbox")
    if raw is None:
        raise Problem(422, "invalid-fields", "mailbox: query parameter is required",
                      [FieldProblem("mailbox", "query parameter is required")])
    try:
        mailbox = MAILBOX.validate_python(raw)
    except ValidationError as exc:
        raise from_validation_error(exc, prefix="mailbox") from None
    if not principal(request).may_act_for(mailbox):
        raise _forbidden()
    items = await request.app[SERVICE].for_mailbox(mailbox)
    return _json(RegistrationList(items=[RegistrationOut.of(r) for r in items]))


async def get_one(request: web.Request) -> web.Response:
    return _json(RegistrationOut.of(await _owned(request)))


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _changes(current: Registration, patch: RegistrationUpdate) -> dict[str, object]:
    changes: dict[str, object] = {}
    problems: list[FieldProblem] = []
    for name in patch.model_fields_set:
        value = getattr(patch, name)
        if name in ("token", "app_id", "environment") and value is None:
            problems.append(FieldProblem(name, "may not be null"))
        elif name == "token":
            try:
                changes["token"] = check_token(current.platform, value)
            except ValueError as exc:
                problems.append(FieldProblem("token", str(exc)))
        elif name == "settings":
            merged = _merge(current.settings.model_dump(mode="json"), value or {}) if value else {}
            try:
                changes["settings"] = DeviceSettings.model_validate(merged)
            except ValidationError as exc:
                problems.extend(from_validation_error(exc, prefix="settings").errors)
        else:
            changes[name] = value
    if problems:
        raise Problem(422, "invalid-fields", "; ".join(f"{p.field}: {p.message}" for p in problems), problems)
    if not changes:
        raise Problem(422, "invalid-fields", "the patch changes nothing; name at least one field",
                      [FieldProblem("(body)", "no fields")])
    return changes


async def patch_one(request: web.Request) -> web.Response:
    patch = await read_model(request, RegistrationUpdate, MERGE_PATCH_TYPES)
    current = await _owned(request)
    changes = _changes(current, patch)
    try:
        updated = await request.app[SERVICE].update(current, changes)
    except RegistrationRejected as exc:
        raise _rejected(exc) from None
    except StoreConflict:
        raise _busy() from None
    if updated is None:
        raise Problem(404, "not-found", "no registration with this id")
    request.app[METRICS].registration_changed("updated")
    return _json(RegistrationOut.of(updated))


async def delete_one(request: web.Request) -> web.Response:
    current = await _owned(request)
    try:
        deleted = await request.app[SERVICE].delete(current.id)
    except StoreConflict:
        raise _busy() from None
    if deleted is None:
        raise Problem(404, "not-found", "no registration with this id")
    request.app[METRICS].registration_changed("deleted")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/registrations", upsert)
    app.router.add_get(f"{PREFIX}/registrations", list_for_mailbox, allow_head=False)
    one = f"{PREFIX}/registrations/{{id:[0-9a-f]{{32}}}}"
    app.router.add_get(one, get_one, allow_head=False)
    app.router.add_patch(one, patch_one)
    app.router.add_delete(one, delete_one)
