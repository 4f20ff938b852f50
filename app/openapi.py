"""The REST API's contract: an OpenAPI 3.1 description, served at /api/openapi.json (browsable at /api/docs).

Written here by hand, beside the code it describes, and checked against it: tests/test_openapi.py fails when
a route of the app is missing here (or described here but not served), and Schemathesis sends generated
requests to every operation and checks each answer against these schemas.
"""
from __future__ import annotations

import functools
from typing import Any

from app.config import config_schema
from app.ratelimit import DEFAULT_RULES
from shared.protocol import MAX_EXAMPLES, PROTOCOL_VERSION

JSON = "application/json"
REASONS = ["protocol_version", "unknown_client", "bad_signature", "payload_mismatch", "wrong_run", "no_open_round",
           "stale_round", "wrong_version", "not_selected", "replay", "bad_examples", "contribution_limit",
           "too_large", "malformed", "shape_mismatch", "dtype_mismatch", "non_finite", "bad_indices",
           "rate_limited"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    what = {400: "the request is malformed; the message says what to fix", 401: "the admin token is missing or "
            "wrong", 404: "no such thing", 409: "it conflicts with the current state", 413: "the body is too large",
            429: "over a rate limit; see Retry-After"}
    return {str(c): _json(_ref("Error"), what[c]) for c in codes}


def _refusals(*codes: int) -> dict[str, Any]:
    return {str(c): _json(_ref("Refused"), "refused with a stable reason; the global model is unchanged")
            for c in codes}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
    "Refused": {"type": "object", "required": ["error", "message", "reason"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                               "reason": {"type": "string", "enum": REASONS}}},
    "Status": {"type": "object", "required": ["state", "active", "round", "model_version", "clients_online",
                                              "config"],
               "properties": {"state": {"type": "string"}, "active": {"type": "boolean"},
                              "run_id": {"type": ["string", "null"]}, "round": {"type": "integer"},
                              "num_rounds": {"type": "integer"},
                              "model_version": {"type": ["integer", "null"]},
                              "clients_online": {"type": "integer"},
                              "waiting_for": {"type": ["integer", "null"],
                                              "description": "connected clients the next round waits for"},
                              "open_round": {"type": ["object", "null"]},
                              "secure_round": {"type": ["object", "null"]}, "config": {"type": "object"},
                              "began": {"type": "object", "properties": {
                                  "how": {"type": "string", "enum": ["resumed", "continued", "fresh"]},
                                  "from_version": {"type": ["integer", "null"]}, "why": {"type": "string"}}}}},
    "Round": {"type": "object", "required": ["round", "model_version", "accuracy", "loss", "clients"],
              "properties": {"round": {"type": "integer"}, "model_version": {"type": "integer"},
                             "accuracy": {"type": ["number", "null"]}, "loss": {"type": ["number", "null"]},
                             "evaluated": {"type": ["integer", "null"],
                                           "description": "1 evaluated; 0 not this round (eval_every)"},
                             "clients": {"type": "array", "items": {"type": "string"}},
                             "dropped": {"type": "array", "items": {"type": "string"}},
                             "why_dropped": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "Run": {"type": "object", "required": ["id", "status", "completed_round", "created"],
            "properties": {"id": {"type": "string"}, "status": {"type": "string"},
                           "stop_reason": {"type": ["string", "null"]}, "completed_round": {"type": "integer"},
                           "created": {"type": "number"}, "from_version": {"type": ["integer", "null"]},
                           "dataset": {"type": ["string", "null"]}, "model": {"type": ["string", "null"]},
                           "num_rounds": {"type": ["integer", "null"]}}},
    "Version": {"type": "object", "required": ["version", "sha256", "source"],
                "properties": {"version": {"type": "integer"}, "sha256": {"type": "string"},
                               "source": {"type": "string"}, "round": {"type": ["integer", "null"]},
                               "accuracy": {"type": ["number", "null"]}}},
    "Client": {"type": "object", "required": ["id", "fingerprint", "status", "accepted", "refusals", "reputation"],
               "properties": {"id": {"type": "string"}, "fingerprint": {"type": "string"},
                              "status": {"type": "string"}, "accepted": {"type": "integer"},
                              "refusals": {"type": "object", "additionalProperties": {"type": "integer"}},
                              "reputation": {"type": "number", "minimum": 0, "maximum": 1}}},
}


def _operations() -> dict[str, dict[str, Any]]:
    admin = [{"bearerAuth": []}]
    ok = lambda schema, text: {"200": _json(schema, text)}  # noqa: E731
    obj = {"type": "object"}
    return {
        "/api/status": {"get": {"summary": "State, run, round, model version, open round, configuration",
                                "responses": ok(_ref("Status"), "the server's state")}},
        "/api/config": {
            "get": {"summary": "The run configuration", "responses": ok(_ref("RunConfig"), "the configuration")},
            "post": {"summary": "Change run settings while no run is active (fields checked together too, e.g. "
                                "krum's clients per round)", "security": admin,
                     "requestBody": {"required": False, "content": {JSON: {"schema": _ref("RunConfig")}}},
                     "responses": {**ok(_ref("RunConfig"), "the new configuration"), **_errors(400, 401, 409)}}},
        "/api/config/schema": {"get": {"summary": "The run configuration's JSON Schema: each field's type, bounds or "
                                                  "choices, default, help and group (the dashboard's form is made "
                                                  "from it)", "responses": ok(obj, "a JSON Schema")}},
        "/api/start": {"post": {
            "summary": "Resume the stored run if it stopped with rounds left; else start a new run, which continues "
                       "from the current model when it can (new_run: from a fresh model); `began` says which and "
                       "why", "security": admin,
            "requestBody": {"required": False, "content": {JSON: {"schema": {
                "type": "object", "additionalProperties": False, "properties": {"new_run": {"type": "boolean"}}}}}},
            "responses": {**ok({"type": "object", "required": ["run_id"],
                                "properties": {"run_id": {"type": "string"}, "status": _ref("Status")}},
                               "the run started"), **_errors(400, 401, 409)}}},
        "/api/stop": {"post": {"summary": "Stop the active run after aborting its open round", "security": admin,
                               "responses": {**ok(obj, "stopping"), **_errors(401, 409)}}},
        "/api/rollback": {"post": {
            "summary": "Copy stored model version N into a new current version (no run active)", "security": admin,
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["version"], "additionalProperties": False,
                "properties": {"version": {"type": "integer", "minimum": 1, "maximum": 2**53 - 1}}}}}},
            "responses": {**ok({"type": "object", "properties": {"rolled_back_to": {"type": "integer"},
                                                                 "model_version": {"type": "integer"}}},
                               "rolled back"), **_errors(400, 401, 404, 409)}}},
        "/api/metrics": {"get": {
            "summary": "Every round of a run done: evaluated, or not to be (eval_every) (default: the current run)",
            "parameters": [{"name": "run_id", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": ok({"type": "object", "required": ["rounds"], "properties": {
                "run_id": {"type": ["string", "null"]}, "current": {"type": ["string", "null"]},
                "rounds": {"type": "array", "items": _ref("Round")}}},
                "the rounds")}},
        "/api/runs": {"get": {"summary": "Every run, newest first (their rounds: /api/metrics?run_id=)",
                              "responses": ok({"type": "object", "required": ["runs"], "properties": {
                                  "runs": {"type": "array", "items": _ref("Run")}}}, "the runs")}},
        "/api/privacy": {"get": {"summary": "The privacy the run spent, round by round: the run's epsilon (dp "
                                            "client), each client's (dp sample, local), the budget's share",
                                 "responses": ok({"type": "object", "required": ["mode", "run", "clients", "latest"]},
                                                 "the privacy spent")}},
        "/api/privacy/audit": {"post": {
            "summary": "Keep a membership-inference audit of a run (bench/privacy_audit.py posts it)",
            "security": admin,
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["run_id", "attacks"],
                "properties": {"run_id": {"type": "string"}, "attacks": {"type": "object", "maxProperties": 16}}}}}},
            "responses": {**ok(obj, "stored"), **_errors(400, 401)}}},
        "/api/clients": {"get": {"summary": "Registered clients: fingerprint, status, outcomes, resources",
                                 "responses": ok({"type": "object", "required": ["clients"], "properties": {
                                     "clients": {"type": "array", "items": _ref("Client")}}}, "the clients")}},
        "/api/refusals": {"get": {
            "summary": "The latest refusals, and the source addresses with the most unverified ones",
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": {**ok({"type": "object", "required": ["refusals", "addresses"], "properties": {
                "refusals": {"type": "array", "items": obj}, "addresses": {"type": "array", "items": obj}}},
                "the refusals"), **_errors(400)}}},
        "/api/models": {"get": {"summary": "Stored model versions", "responses": ok({
            "type": "object", "required": ["versions"], "properties": {
                "current": {"type": ["integer", "null"]}, "versions": {"type": "array", "items": _ref("Version")}}},
            "the versions")}},
        "/api/model/{version}": {"get": {
            "summary": "A model version's checkpoint (safetensors), with X-Model-SHA256",
            "parameters": [{"name": "version", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^(latest|[0-9]{1,15})$"}}],
            "responses": {"200": {"description": "the checkpoint", "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}, **_errors(404)}}},
        "/api/model/{version}/delta": {"get": {
            "summary": "The int8-coded step from version ?from= to this one (download_compression int8), when the "
                       "server kept it; X-Model-SHA256 is the whole model's, to check the rebuilt one against",
            "parameters": [{"name": "version", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,15}$"}},
                           {"name": "from", "in": "query", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,15}$"}}],
            "responses": {"200": {"description": "the coded step (safetensors)", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, **_errors(404)}}},
        "/api/system": {"get": {"summary": "The server's resource samples and alerts", "responses": ok(
            {"type": "object", "required": ["samples", "alerts"]}, "resources and alerts")}},
        "/api/mesh": {"get": {"summary": "Offline contributions and gossip edges", "responses": ok(
            {"type": "object", "required": ["contributions", "edges"]}, "the mesh")}},
        "/api/roster": {"get": {"summary": "Registered clients' key fingerprints, signed by the server",
                                "responses": ok({"type": "object", "required": ["clients", "signature"]},
                                                "the signed roster")}},
        "/api/challenge": {"get": {"summary": "A fresh challenge for a client's signed registration on /fl",
                                   "responses": {**ok({"type": "object", "required": ["challenge", "expires_in"]},
                                                      "a challenge"), **_errors(429)}}},
        "/api/update": {"post": {
            "summary": f"One signed update: an MFU1 frame ({PROTOCOL_VERSION}, shared/protocol.py)",
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {**ok({"type": "object", "required": ["accepted", "round"]}, "accepted"),
                          "202": _json({"type": "object", "required": ["straggler"]}, "late: recorded as a "
                                       "straggler (merged later or dropped), never an error"),
                          **_refusals(400, 409, 413, 429)}}},
        "/api/sync": {"post": {
            "summary": "One signed offline contribution from the mesh: an MFS1 frame; idempotent by its id",
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {**ok({"type": "object", "required": ["accepted", "duplicate"]}, "kept for the next "
                               "round (or already known)"), **_refusals(400, 409, 413, 429)}}},
        "/api/openapi.json": {"get": {"summary": "This description", "responses": ok(obj, "OpenAPI 3.1")}},
        "/api/docs": {"get": {"summary": "This description, browsable (Swagger UI)", "responses": {
            "200": {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        **_edge_operations(admin, ok),
        "/healthz": {"get": {"summary": "Liveness", "responses": ok(obj, "alive")}},
        "/readyz": {"get": {"summary": "Readiness: state dir writable, database answers, loop alive", "responses": {
            **ok({"type": "object", "required": ["ready", "checks"]}, "ready"),
            "503": _json({"type": "object", "required": ["ready", "checks"]}, "not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }


def _edge_operations(admin: list[dict[str, Any]], ok: Any) -> dict[str, dict[str, Any]]:
    """What an edge server (app/edge.py) asks of its leader, with the admin token; 404 on a leader without a tier."""
    text = lambda pattern, most: {"type": "string", "pattern": f"^{pattern}$", "maxLength": most}  # noqa: E731
    fields = {"edge": text("[A-Za-z0-9_.:-]{1,64}", 64), "client_id": text("[A-Za-z0-9_.-]{1,64}", 64),
              "sid": text("[A-Za-z0-9_-]{1,64}", 64), "public_key": {"type": "string", "minLength": 1,
                                                                    "maxLength": 8192},
              "fingerprint": {"type": "string", "minLength": 1, "maxLength": 256},
              "num_examples": {"type": "integer", "minimum": 1, "maximum": MAX_EXAMPLES}, "status": {"type": "object"}}
    fields["replace"] = fields["sid"]

    def post(summary: str, names: list[str], answer: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": admin, "requestBody": {"required": True, "content": {
            JSON: {"schema": {"type": "object", "required": names, "additionalProperties": False,
                              "properties": {n: fields[n] for n in [*names, *optional]}}}}},
            "responses": {**ok({"type": "object"}, answer), **_errors(400, 401, 404, 409)}}}
    return {
        "/api/edge/connect": post("An edge admitted a client's signed registration: pin its key, record its session "
                                  "(409 key_mismatch or already_connected; already_connected names held_sid when the "
                                  "live session is on the asking edge, which may then ask again with replace=held_sid "
                                  "if that socket is closed there)",
                                  ["edge", "client_id", "sid", "public_key", "fingerprint", "num_examples"],
                                  "recorded: the run id", optional=("replace",)),
        "/api/edge/disconnect": post("A client left its edge", ["edge", "client_id", "sid"], "forgotten"),
        "/api/edge/status": post("A client's status report, forwarded by its edge",
                                 ["edge", "client_id", "sid", "status"], "applied"),
        "/api/edge/client/{client_id}": {"get": {
            "summary": "A registered client's pinned key and examples (what an edge verifies its updates with)",
            "security": admin, "parameters": [{"name": "client_id", "in": "path", "required": True,
                                               "schema": {"type": "string"}}],
            "responses": {**ok({"type": "object", "required": ["client_id", "public_key", "num_examples"]},
                               "the pinned key"), **_errors(401, 404)}}},
    }


@functools.lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "meshfed", "version": PROTOCOL_VERSION,
                 "description": "The meshfed server's REST API. Changes need the admin token as a bearer token; "
                                "updates and syncs are signed frames (README: Protocol). Rate limits per source "
                                f"address and per verified client: {', '.join(DEFAULT_RULES)} (README)."},
        "paths": _operations(),
        "components": {"schemas": {**SCHEMAS, "RunConfig": config_schema()},
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }
