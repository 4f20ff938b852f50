"""The REST API's contract (app/openapi.py): it describes every route the server serves and nothing else, and
Schemathesis sends generated requests to every operation, with and without the admin token: no 5xx, every
answer conforms to the description (status, content type, schema, Allow on 405), and admin operations refuse
a missing or wrong token. Swagger UI shows the description in Chromium, offline and within the CSP."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import ignored_auth, positive_data_acceptance

from app import create_app
from app.config import RunConfig, ServerConfig
from app.openapi import spec

ADMIN = "contract-admin"
NOT_API = {"dashboard.index", "dashboard.login", "dashboard.logout", "dashboard.static"}  # HTML pages and assets
# Schema-valid but refused by design, so Schemathesis' "valid data is accepted" check does not apply: signed
# binary frames (any bytes match format: binary) and settings that are only valid together (krum's n > 2f + 2).
FRAMES_AND_CROSS_FIELD = {("POST", "/api/update"), ("POST", "/api/sync"), ("POST", "/api/config")}


@pytest.fixture(scope="module")
def api_app(tmp_path_factory):
    app = create_app(ServerConfig(state_dir=str(tmp_path_factory.mktemp("state")), admin_token=ADMIN,
                                  enrollment_token="contract-enroll", run=RunConfig(dataset="synthetic", model="mlp")))
    yield app
    runs = app.extensions["meshfed"].runs
    if runs.status()["active"]:
        runs.stop()
        runs.wait_inactive(10)
    app.extensions["meshfed"].store.close()


@pytest.fixture(scope="module")
def api_schema(api_app):
    return schemathesis.openapi.from_wsgi("/api/openapi.json", api_app)


def served_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_API:
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes |= {(method, path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_every_route_is_described_and_every_description_is_served(api_app):
    described = {(method.upper(), path) for path, ops in spec()["paths"].items() for method in ops}
    served = served_routes(api_app)
    assert served - described == set(), "routes missing from app/openapi.py"
    assert described - served == set(), "described in app/openapi.py but not served"
    assert api_app.test_client().get("/api/openapi.json").get_json()["openapi"] == "3.1.0"


def test_a_route_missing_from_the_description_is_caught(tmp_path):
    """The check above can fail: a route added without describing it shows up."""
    app = create_app(ServerConfig(state_dir=str(tmp_path), admin_token=ADMIN, enrollment_token="e",
                                  run=RunConfig(dataset="synthetic", model="mlp")))
    app.add_url_rule("/api/undocumented", "undocumented", lambda: {})
    described = {(m.upper(), p) for p, ops in spec()["paths"].items() for m in ops}
    assert served_routes(app) - described == {("GET", "/api/undocumented")}
    app.extensions["meshfed"].store.close()


schema = schemathesis.pytest.from_fixture("api_schema")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_api_without_the_token(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    if case.operation.definition.raw.get("security") and case.method.upper() == case.operation.method.upper():
        assert response.status_code == 401, (case.method, case.path, response.text)  # missing or wrong token


@schema.parametrize()
@FUZZ
def test_api_with_the_token(case):
    excluded = [positive_data_acceptance] if (case.method, case.path) in FRAMES_AND_CROSS_FIELD else []
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, excluded_checks=excluded,
                           additional_checks=[ignored_auth])


def test_swagger_ui_shows_the_api_offline_and_within_the_csp(cluster):
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM_ARGS, _chromium
    cluster.start_server("--dataset", "synthetic", "--model", "mlp")
    cluster.wait_ready()
    errors, foreign = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: foreign.append(r.url) if "127.0.0.1" not in r.url
                    and not r.url.startswith("data:") else None)
            page.goto(cluster.url + "/api/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = set(page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)"))
        finally:
            browser.close()
    assert paths == set(spec()["paths"]), paths
    assert errors == [] and foreign == [], (errors, foreign)
    assert Path(cluster.workdir / "server.log").exists()
