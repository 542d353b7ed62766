"""The client agrees with the daemon's OpenAPI document (/v1/openapi.json)."""

from __future__ import annotations

import pytest

from gworker_client import exceptions
from gworker_client.sandbox import Sandbox


@pytest.fixture(scope="module")
def openapi(daemon):
    status, doc = daemon.request("GET", "/v1/openapi.json")
    assert status == 200
    return doc


def test_every_error_code_has_its_class(openapi):
    codes = openapi["components"]["schemas"]["ErrorCode"]["enum"]
    for code in codes:
        err = exceptions.error_from_response(400, code, "m")
        assert type(err) is not exceptions.GworkerError, f"no class for {code}"
        assert err.code == code
    assert set(exceptions._BY_CODE) == set(codes)


def test_request_fields_are_known(openapi):
    schemas = openapi["components"]["schemas"]
    create_fields = {"cmd", "image", "timeout", "env", "workdir", "secrets", "volumes", "snapshot"}
    assert create_fields <= set(schemas["CreateSandbox"]["properties"])
    assert {"cmd", "env", "workdir"} <= set(schemas["Exec"]["properties"])


def test_paths_the_client_uses_exist(openapi):
    used = [
        "/v1/sandboxes", "/v1/sandboxes/{id}", "/v1/sandboxes/{id}/wait", "/v1/sandboxes/{id}/exec",
        "/v1/sandboxes/{id}/snapshot", "/v1/sandboxes/{id}/processes/{pid}",
        "/v1/sandboxes/{id}/processes/{pid}/wait", "/v1/sandboxes/{id}/processes/{pid}/stdout",
        "/v1/sandboxes/{id}/processes/{pid}/stderr", "/v1/sandboxes/{id}/processes/{pid}/stdin",
        "/v1/sandboxes/{id}/processes/{pid}/stdin/close", "/v1/sandboxes/{id}/processes/{pid}/signal",
    ]
    missing = [p for p in used if p not in openapi["paths"]]
    assert not missing
    assert Sandbox.create.__doc__ and "Returns immediately" in Sandbox.create.__doc__
