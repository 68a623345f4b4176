"""The OpenAPI document stays true: every route is in it, nothing else is, and real responses match its schemas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from bemsmail.api.openapi import PATH
from tests.support import ANDROID_APP, ANDROID_TOKEN, Api, dev_config, registration, running_api


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config, key = dev_config(tmp_path)
    async with running_api(config, key) as api:
        yield api


def _router_operations(api: Api) -> set[tuple[str, str]]:
    ops = set()
    for route in api.client.app.router.routes():  # type: ignore[union-attr]
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        path = path.replace("{id:[0-9a-f]{32}}", "{id}") if "{id" in path else path
        ops.add((path, route.method.lower()))
    return ops


async def test_every_route_is_documented_and_nothing_else(api: Api) -> None:
    doc = await (await api.client.get(PATH)).json()
    assert doc["openapi"].startswith("3.1")
    documented = {
        (path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"
    }
    assert documented == _router_operations(api)


class Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource("urn:doc", DRAFT202012.create_resource(doc))

    def check(self, path: str, method: str, status: int, content_type: str, body: Any) -> None:
        op = self.doc["paths"][path][method]
        response = op["responses"].get(str(status))
        assert response is not None, f"{method.upper()} {path} answered {status}, which is not documented"
        media = content_type.split(";")[0]
        if status == 204:
            return
        schema = response["content"][media]["schema"]
        validator = Draft202012Validator({"$ref": "urn:doc#" + schema["$ref"][1:]} if "$ref" in schema else schema,
                                         registry=self.registry)
        errors = list(validator.iter_errors(body))
        assert errors == [], [e.message for e in errors]


async def test_responses_match_their_schemas(api: Api) -> None:
    doc = await (await api.client.get(PATH)).json()
    checker = Checker(doc)
    h = api.headers
    url = "/api/v1/registrations"
    one = "/api/v1/registrations/{id}"
    calls: list[tuple[str, str, Any]] = []

    async def call(path: str, method: str, real_path: str, **kwargs: Any) -> Any:
        resp = await api.client.request(method.upper(), real_path, **kwargs)
        text = await resp.text()
        body = json.loads(text) if text else None
        checker.check(path, method, resp.status, resp.headers.get("Content-Type", ""), body)
        calls.append((path, method, resp.status))
        return body

    created = await call(url, "post", url, json=registration(settings={"quiet_hours": {"start": "22:00",
                                                                                         "end": "06:30"}}), headers=h)
    await call(url, "post", url, json=registration(locale="de"), headers=h)
    await call(url, "post", url, json=registration(platform="android", token=ANDROID_TOKEN, app_id=ANDROID_APP,
                                                   device_id="p"), headers=h)
    await call(url, "post", url, data="{", headers={**h, "Content-Type": "application/json"})
    await call(url, "post", url, json={"mailbox": 1}, headers=h)
    await call(url, "post", url, json=registration())
    await call(url, "post", url, data="x", headers={**h, "Content-Type": "text/plain"})
    await call(url, "get", url + "?mailbox=alice@example.com", headers=h)
    await call(url, "get", url, headers=h)
    rid = created["id"]
    await call(one, "get", f"{url}/{rid}", headers=h)
    await call(one, "get", f"{url}/{'0' * 32}", headers=h)
    await call(one, "patch", f"{url}/{rid}", json={"locale": "fr"}, headers=h)
    await call(one, "patch", f"{url}/{rid}", json={"token": None}, headers=h)
    await call(one, "delete", f"{url}/{rid}", headers=h)
    await call(one, "delete", f"{url}/{rid}", headers=h)
    await call("/healthz", "get", "/healthz")
    await call("/readyz", "get", "/readyz")
    statuses = {status for _, _, status in calls}
    assert {200, 201, 204, 400, 401, 404, 415, 422} <= statuses
