"""The REST API under /api: status, control, config, metrics, clients, models and updates."""
from __future__ import annotations

import hmac
from functools import wraps
from typing import Any, Callable

from flask import Blueprint, Response, current_app, jsonify, request

from app.rounds import Conflict, RoundLoop
from shared.errors import ConfigError, UpdateRefused
from shared.protocol import signed_roster, unpack_sync, unpack_update

bp = Blueprint("api", __name__, url_prefix="/api")


def _loop() -> RoundLoop:
    return current_app.extensions["meshfed"].loop


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def admin_required(view: Callable) -> Callable:
    """Refuse unless the request carries the admin token (Authorization: Bearer <token>)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        expected = current_app.extensions["meshfed"].config.admin_token
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return error(401, "unauthorized", "send the admin token printed at server start as "
                                              "'Authorization: Bearer <token>'")
        return view(*args, **kwargs)

    return wrapped


@bp.errorhandler(Conflict)
def on_conflict(exc: Conflict) -> Any:
    return error(409, "conflict", str(exc))


@bp.errorhandler(ConfigError)
def on_config_error(exc: ConfigError) -> Any:
    return error(400, "invalid_config", "fix the fields listed in 'fields'", fields=exc.fields)


@bp.get("/status")
def status() -> Any:
    return jsonify(_loop().status())


@bp.post("/start")
@admin_required
def start() -> Any:
    body = request.get_json(silent=True) or {}
    run_id = _loop().start(new_run=bool(body.get("new_run", False)))
    return jsonify({"run_id": run_id, "status": _loop().status()})


@bp.post("/stop")
@admin_required
def stop() -> Any:
    _loop().stop()
    return jsonify({"stopping": True})


@bp.get("/config")
def get_config() -> Any:
    return jsonify(_loop().run_config.to_dict())


@bp.post("/config")
@admin_required
def set_config() -> Any:
    changes = request.get_json(silent=True)
    if changes is None:
        return error(400, "invalid_config", "send a JSON object of field: value")
    return jsonify(_loop().set_config(changes).to_dict())


@bp.get("/metrics")
def metrics() -> Any:
    loop = _loop()
    run_id = request.args.get("run_id", loop.run_id)
    rounds = loop.store.rounds(run_id) if run_id else []
    return jsonify({"run_id": run_id, "rounds": rounds})


@bp.get("/clients")
def clients() -> Any:
    return jsonify({"clients": current_app.extensions["meshfed"].clients_view()})


@bp.get("/refusals")
def refusals() -> Any:
    return jsonify({"refusals": _loop().store.refusals(int(request.args.get("limit", 100)))})


@bp.get("/models")
def models() -> Any:
    return jsonify({"current": _loop().global_version, "versions": _loop().store.versions()})


@bp.get("/system")
def system() -> Any:
    """The server's resource samples and alerts (what the dashboard's system panel shows)."""
    return jsonify(current_app.extensions["meshfed"].monitor.snapshot())


@bp.get("/model/<version>")
def model(version: str) -> Any:
    loop = _loop()
    number, data, digest = loop.global_model()  # the current version is served from memory
    if version != "latest" and (not version.isdigit() or int(version) != number):
        row = loop.store.get_version(int(version)) if version.isdigit() else None
        number, data, digest = (None, None, None) if row is None else (
            row["version"], loop.store.read_model(row["version"]), row["sha256"])
    if data is None:
        return error(404, "no_such_version", f"no model version {version!r}; GET /api/models lists them")
    current_app.extensions["meshfed"].traffic.add(sent=len(data))
    return Response(data, mimetype="application/octet-stream", headers={
        "X-Model-Version": str(number), "X-Model-SHA256": digest,
        "Content-Disposition": f"attachment; filename=meshfed-model-v{number}.safetensors"})


@bp.post("/rollback")
@admin_required
def rollback() -> Any:
    body = request.get_json(silent=True) or {}
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        return error(400, "bad_request", "send {\"version\": <int>}; GET /api/models lists them")
    try:
        new = _loop().rollback(version)
    except KeyError:
        return error(404, "no_such_version", f"no model version {version}; GET /api/models lists them")
    return jsonify({"rolled_back_to": version, "model_version": new})


@bp.post("/sync")
def sync() -> Any:
    """Receive one packed, signed offline contribution (shared/protocol.py pack_sync)."""
    loop = _loop()
    client_hint = request.headers.get("X-Meshfed-Client")
    limit = current_app.extensions["meshfed"].config.max_update_bytes
    try:
        if request.content_length is None:
            raise UpdateRefused("malformed", "send a Content-Length header")
        if request.content_length > limit:
            raise UpdateRefused("too_large", f"body is {request.content_length} bytes, the limit is {limit}")
        header, payload = unpack_sync(request.get_data(cache=False))
        reply = loop.offer_contribution(header, payload)
    except UpdateRefused as exc:
        loop.count_refusal(client_hint, None, exc)
        status = 413 if exc.reason == "too_large" else 409 if exc.reason in ("replay", "wrong_version") else 400
        return error(status, exc.reason, str(exc), reason=exc.reason)
    return jsonify(reply)


@bp.get("/mesh")
def mesh() -> Any:
    return jsonify(_loop().mesh_view())


@bp.get("/roster")
def roster() -> Any:
    """Registered clients' key fingerprints, signed by the server: mesh peers trust each other by it."""
    meshfed = current_app.extensions["meshfed"]
    return jsonify(signed_roster(meshfed.server_key, {c["id"]: c["fingerprint"] for c in meshfed.store.clients()}))


@bp.post("/update")
def update() -> Any:
    """Receive one packed, signed update (see shared/protocol.py)."""
    loop = _loop()
    client_hint = request.headers.get("X-Meshfed-Client")  # unverified; only to attribute refusals
    limit = current_app.extensions["meshfed"].config.max_update_bytes
    size = request.content_length
    try:
        if size is None:
            raise UpdateRefused("malformed", "send a Content-Length header")
        if size > limit:
            raise UpdateRefused("too_large", f"body is {size} bytes, the limit is {limit}")
        body = request.get_data(cache=False)
        current_app.extensions["meshfed"].traffic.add(received=len(body))
        header, payload = unpack_update(body)
    except UpdateRefused as exc:
        loop.count_refusal(client_hint, None, exc)
        return error(413 if exc.reason == "too_large" else 400, exc.reason, str(exc), reason=exc.reason)
    try:
        outcome = loop.offer(header, payload)
    except UpdateRefused as exc:
        loop.count_refusal(header.client_id, header.round, exc)
        status = 409 if exc.reason in ("stale_round", "no_open_round", "replay", "wrong_version") else 400
        return error(status, exc.reason, str(exc), reason=exc.reason)
    if outcome != "accepted":  # a straggler: recorded, merged later or dropped, never an error
        return jsonify({"accepted": False, "straggler": outcome.removeprefix("straggler_"), "round": header.round}), 202
    return jsonify({"accepted": True, "round": header.round})
