"""The REST API under /api: status, control, config, metrics, clients, models, updates and enrollment.

Every answer is JSON, errors included ({"error", "message"}, plus "reason" for refused updates); the
contract is app/openapi.py, served at /api/openapi.json and browsable at /api/docs.
"""
from __future__ import annotations

import hmac
import logging
import re
from functools import wraps
from typing import Any, Callable

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import ClientDisconnected

from app.config import config_schema
from app.enrollment import CHALLENGE_SECONDS
from app.openapi import spec
from app.ratelimit import RateLimited
from app.refusals import Refusal
from app.rounds import RoundLoop
from app.runs import Conflict, Runs
from app.verify import authenticate
from app.fl import apply_status
from app.registry import IDLE, Session
from shared.errors import ConfigError, DatasetNotFound, RegistrationRefused, UpdateRefused
from shared.frames import CLIENT_ID
from shared.protocol import MAX_EXAMPLES, signed_roster, unpack_sync, unpack_update

bp = Blueprint("api", __name__, url_prefix="/api", template_folder="templates")
log = logging.getLogger("meshfed.api")
CLIENT_ID_RE = re.compile(CLIENT_ID)

VERSION = re.compile(r"latest|[0-9]{1,15}")  # a model version in the path (SQLite integers hold 15 digits)
REFUSAL_STATUS = {"too_large": 413, "rate_limited": 429, "stale_round": 409, "no_open_round": 409, "replay": 409,
                  "wrong_version": 409, "contribution_limit": 409, "not_sharded": 409, "leader_unreachable": 503,
                  "queue_unreachable": 503}


def _meshfed() -> Any:
    return current_app.extensions["meshfed"]


def _runs() -> Runs:
    return _meshfed().runs


def _rounds() -> RoundLoop:
    return _meshfed().rounds


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def bearer_ok(header: str | None, expected: str) -> bool:
    """True iff `header` is 'Bearer <expected>' (the scheme is case-insensitive, RFC 6750), in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def admin_required(view: Callable) -> Callable:
    """Refuse unless the request carries the admin token (Authorization: Bearer <token>)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not bearer_ok(request.headers.get("Authorization"), _meshfed().config.admin_token):
            return error(401, "unauthorized", "send the admin token (state/tokens.json, or what the server was "
                                              "given) as 'Authorization: Bearer <token>'")
        return view(*args, **kwargs)

    return wrapped


def _json_object(*known: str) -> dict[str, Any]:
    """The request's JSON body as an object ({} when there is none); BadBody (400) if it is not one, or (when
    `known` names the fields) if it has others."""
    if not request.content_length:
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadBody("send a JSON object (Content-Type: application/json)")
    unknown = sorted(set(body) - set(known)) if known else []
    if unknown:
        raise BadBody(f"unknown field {unknown[0][:40]!r}; this endpoint reads {', '.join(known)}")
    return body


class BadBody(Exception):
    """The request body is not what the endpoint reads."""


class NoTier(Exception):
    """An edge's request reached a leader without a message queue (no tier: app/tier.py)."""


@bp.errorhandler(NoTier)
def on_no_tier(exc: NoTier) -> Any:
    return error(404, "no_tier", "this leader has no edge tier: start it with --message-queue")


@bp.errorhandler(BadBody)
def on_bad_body(exc: BadBody) -> Any:
    return error(400, "bad_request", str(exc))


@bp.errorhandler(Conflict)
def on_conflict(exc: Conflict) -> Any:
    return error(409, "conflict", str(exc))


@bp.errorhandler(ConfigError)
def on_config_error(exc: ConfigError) -> Any:
    return error(400, "invalid_config", "fix the fields listed in 'fields'", fields=exc.fields)


# --- reading -------------------------------------------------------------------------------------

@bp.get("/status")
def status() -> Any:
    return jsonify(_runs().status())


@bp.get("/config")
def get_config() -> Any:
    return jsonify(_runs().run_config.to_dict())


@bp.get("/config/schema")
def get_config_schema() -> Any:
    return jsonify(config_schema())


@bp.get("/metrics")
def metrics() -> Any:
    runs = _runs()
    run_id = request.args.get("run_id", runs.run_id)
    rounds = runs.store.rounds(run_id) if run_id else []
    return jsonify({"run_id": run_id, "current": runs.run_id, "rounds": rounds})


@bp.get("/runs")
def runs_list() -> Any:
    return jsonify({"runs": _runs().store.runs()})


@bp.get("/privacy")
def privacy() -> Any:
    """What the run spent of its privacy budget, round by round, and its latest membership-inference audit."""
    return jsonify(_meshfed().control.privacy())


@bp.post("/privacy/audit")
@admin_required
def privacy_audit() -> Any:
    """Keep a membership-inference audit of a run (bench/privacy_audit.py): its attacks' AUC, TPR at low FPR and
    the lower bound on epsilon they imply, beside the accountant's epsilon; the dashboard shows the latest."""
    report = _json_object()
    run_id = report.get("run_id")
    if not isinstance(run_id, str) or not isinstance(report.get("attacks"), dict) or len(report["attacks"]) > 16:
        raise BadBody("send the audit as {\"run_id\": ..., \"attacks\": {name: {auc, ...}}, ...}")
    _runs().store.add_audit(run_id, report)
    _meshfed().socketio.emit("privacy_update", _meshfed().control.privacy(), namespace="/dashboard")
    return jsonify({"stored": True})


@bp.get("/clients")
def clients() -> Any:
    return jsonify({"clients": _meshfed().clients_view()})


@bp.get("/refusals")
def refusals() -> Any:
    """The latest refusals, and the source addresses with the most refusals nobody's signature vouched for."""
    limit = request.args.get("limit", "100")
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 1000):
        return error(400, "bad_request", "limit must be a whole number from 1 to 1000")
    rounds = _rounds()
    rounds.refusals.flush()
    return jsonify({"refusals": rounds.store.refusals(int(limit)), "addresses": rounds.store.address_refusals()})


@bp.get("/models")
def models() -> Any:
    return jsonify({"current": _runs().global_version, "versions": _runs().store.versions()})


@bp.get("/model/<version>")
def model(version: str) -> Any:
    if not VERSION.fullmatch(version):
        return error(404, "no_such_version", f"no model version {version[:20]!r}; GET /api/models lists them")
    store, now = _runs().store, _runs().model.now()  # the current version is served from memory
    number, data, digest = now.version, now.data, now.sha256
    if version != "latest" and int(version) != number:
        row = store.get_version(int(version))
        number, data, digest = (None, None, None) if row is None else (
            row["version"], store.read_model(row["version"]), row["sha256"])
    if data is None:
        return error(404, "no_such_version", f"no model version {version!r}; GET /api/models lists them")
    _meshfed().traffic.add(sent=len(data))
    return Response(data, mimetype="application/octet-stream", headers={
        "X-Model-Version": str(number), "X-Model-SHA256": digest,
        "Content-Disposition": f"attachment; filename=meshfed-model-v{number}.safetensors"})


@bp.get("/model/<version>/delta")
def model_delta(version: str) -> Any:
    """The int8-coded step from version ?from= to `version` (download_compression int8), if the server kept it:
    the client applies it and checks the result against X-Model-SHA256, the full model's; else 404."""
    base = request.args.get("from", "")
    numbers = version != "latest" and VERSION.fullmatch(version) and VERSION.fullmatch(base) and base != "latest"
    kept = _rounds().downlink.step(int(version), int(base)) if numbers else None
    row = _runs().store.get_version(int(version)) if kept is not None else None
    if kept is None or row is None:
        return error(404, "no_delta", f"no coded step from version {base[:20]!r} to {version[:20]!r}; "
                                      f"GET /api/model/{version[:20]} for the whole model")
    _meshfed().traffic.add(sent=len(kept), delta=True)
    return Response(kept, mimetype="application/octet-stream", headers={
        "X-Model-Version": version, "X-Model-SHA256": row["sha256"], "X-Delta-From": base})


@bp.get("/system")
def system() -> Any:
    """The server's resource samples and alerts (what the dashboard's system panel shows)."""
    return jsonify(_meshfed().monitor.snapshot())


@bp.get("/mesh")
def mesh() -> Any:
    return jsonify(_rounds().merges.view())


@bp.get("/roster")
def roster() -> Any:
    """Registered clients' key fingerprints, signed by the server: mesh peers trust each other by it."""
    meshfed = _meshfed()
    return jsonify(signed_roster(meshfed.server_key, {c["id"]: c["fingerprint"] for c in meshfed.store.clients()}))


@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(spec())


@bp.get("/docs")
def docs() -> Any:
    """The API description, browsable (Swagger UI, served from dashboard/static/vendor)."""
    return render_template("api_docs.html")


# --- control (admin) ------------------------------------------------------------------------------

@bp.post("/start")
@admin_required
def start() -> Any:
    new_run = _json_object("new_run").get("new_run", False)
    if not isinstance(new_run, bool):
        raise BadBody("new_run must be true or false")
    try:
        run_id = _runs().start(new_run=new_run)
    except DatasetNotFound as exc:  # the request is fine; the configured dataset is not on this server
        return error(409, "dataset_not_found", str(exc))
    return jsonify({"run_id": run_id, "status": _runs().status()})


@bp.post("/stop")
@admin_required
def stop() -> Any:
    _runs().stop()
    return jsonify({"stopping": True})


@bp.post("/config")
@admin_required
def set_config() -> Any:
    return jsonify(_runs().set_config(_json_object()).to_dict())


@bp.post("/rollback")
@admin_required
def rollback() -> Any:
    version = _json_object("version").get("version")
    if isinstance(version, float) and version.is_integer():  # JSON Schema's integers include 3.0
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadBody("send {\"version\": <int>}; GET /api/models lists them")
    try:
        new = _runs().rollback(version)
    except KeyError:
        return error(404, "no_such_version", f"no model version {version}; GET /api/models lists them")
    return jsonify({"rolled_back_to": version, "model_version": new})


# --- clients --------------------------------------------------------------------------------------

@bp.get("/challenge")
def challenge() -> Any:
    """A fresh challenge for a client to sign in its registration (app/enrollment.py)."""
    meshfed = _meshfed()
    try:
        meshfed.limits.hit("connect-per-address", request.remote_addr)
    except RateLimited as exc:
        return _refusal_reply(exc)
    return jsonify({"challenge": meshfed.enrollment.challenge(), "expires_in": CHALLENGE_SECONDS})


def read_signed_body(rule: str) -> bytes:
    """The body of a signed upload, within the address's rate and the size limit; UpdateRefused otherwise."""
    meshfed = _meshfed()
    meshfed.limits.hit(rule, request.remote_addr)
    limit, size = meshfed.config.max_update_bytes, request.content_length
    if size is None:
        raise UpdateRefused("malformed", "send a Content-Length header")
    if size > limit:
        raise UpdateRefused("too_large", f"body is {size} bytes, the limit is {limit}")
    try:
        body = request.get_data(cache=False)
    except ClientDisconnected:
        raise UpdateRefused("malformed", "the body ended before its Content-Length") from None
    meshfed.traffic.add(received=len(body))
    return body


def _refusal_reply(exc: UpdateRefused, client_id: str | None = None, round_no: int | None = None) -> Any:
    """Count the refusal (against the verified client, else the source address) and answer it."""
    message = str(exc)
    _rounds().count_refusal(Refusal(exc.reason, message, client_id=client_id,
                                    address=None if client_id else request.remote_addr, run_id=_runs().run_id,
                                    round=round_no))
    reply, status = error(REFUSAL_STATUS.get(exc.reason, 400), exc.reason, message, reason=exc.reason)
    if isinstance(exc, RateLimited):
        reply.headers["Retry-After"] = str(int(exc.retry_after + 0.999))
    return reply, status


@bp.post("/update")
def update() -> Any:
    """Receive one packed, signed update (shared/protocol.py pack_update)."""
    rounds, limits = _rounds(), _meshfed().limits
    try:
        header, payload = unpack_update(read_signed_body("update-per-address"))
        verified = authenticate(rounds.store, header, payload)
    except UpdateRefused as exc:  # nobody's signature vouches for this request: the address answers for it
        return _refusal_reply(exc)
    try:  # from here on the sender is proven: refusals are its own
        limits.hit("update-per-client", header.client_id)
        outcome = rounds.collection.offer(verified, _runs().run_config.stragglers == "merge")
    except UpdateRefused as exc:
        return _refusal_reply(exc, header.client_id, header.round)
    notes = {"notes": list(header.notes)} if header.notes else {}
    if outcome != "accepted":  # a straggler: recorded, merged later or dropped, never an error
        return jsonify({"accepted": False, "straggler": outcome.removeprefix("straggler_"), "round": header.round,
                        **notes}), 202
    return jsonify({"accepted": True, "round": header.round, **notes})


# --- edges (app/tier.py, app/edge.py): an edge server forwards its clients' sessions; admin token ---------

EDGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _edge_body(*fields: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """An edge's JSON body with its fields checked (BadBody naming the first that is off); NoTier without a tier."""
    if _meshfed().tier is None:
        raise NoTier()
    body = _json_object(*fields, *optional)
    checks = {"edge": lambda v: isinstance(v, str) and EDGE_ID.fullmatch(v),
              "client_id": lambda v: isinstance(v, str) and CLIENT_ID_RE.fullmatch(v),
              "sid": lambda v: isinstance(v, str) and SID.fullmatch(v),
              "public_key": lambda v: isinstance(v, str) and 0 < len(v) <= 8192,
              "fingerprint": lambda v: isinstance(v, str) and 0 < len(v) <= 256,
              "num_examples": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_EXAMPLES,
              "status": lambda v: isinstance(v, dict)}
    checks["replace"] = checks["sid"]
    for name in fields:
        if name not in body or not checks[name](body[name]):
            raise BadBody(f"{name} is missing or malformed")
    for name in optional:
        if name in body and not checks[name](body[name]):
            raise BadBody(f"{name} is malformed")
    return body


@bp.post("/edge/connect")
@admin_required
def edge_connect() -> Any:
    """An edge admitted a client's signed registration: pin its key and record its session here (or refuse)."""
    meshfed = _meshfed()
    body = _edge_body("edge", "client_id", "sid", "public_key", "fingerprint", "num_examples", optional=("replace",))
    try:
        meshfed.store.pin_client(body["client_id"], body["public_key"], body["fingerprint"], body["num_examples"])
    except RegistrationRefused as exc:
        return error(409, exc.reason, str(exc), reason=exc.reason)
    session = Session(client_id=body["client_id"], sid=body["sid"], fingerprint=body["fingerprint"],
                      num_examples=body["num_examples"], state=IDLE, edge=body["edge"])
    old = meshfed.registry.get(body["client_id"])  # its edge's liveness asked of Redis outside the registry's lock
    dead = old.sid if old is not None and old.edge is not None and not meshfed.tier.alive(old.edge) else None
    if old is not None and old.edge == body["edge"] and body.get("replace") == old.sid:
        dead = old.sid  # the edge holding it says that socket is closed (a disconnect whose notice was lost)
    if not meshfed.registry.connect(session, replace=dead):
        # the edge that holds the old session is told its sid, to check it and ask again with replace=<sid>
        held = {"held_sid": old.sid} if old is not None and old.edge == body["edge"] else {}
        return error(409, "already_connected", f"{body['client_id']!r} has a live session; a client id connects "
                                               "once at a time", reason="already_connected", **held)
    log.info("client %s connected through edge %s (%s)", body["client_id"], body["edge"], body["fingerprint"][:19])
    _runs().notify()
    return jsonify({"run_id": _runs().run_id})


@bp.post("/edge/disconnect")
@admin_required
def edge_disconnect() -> Any:
    body = _edge_body("edge", "client_id", "sid")
    meshfed = _meshfed()
    session = meshfed.registry.get(body["client_id"])
    gone = session is not None and session.sid == body["sid"] and meshfed.registry.disconnect(body["sid"])
    if gone:
        log.info("client %s disconnected from edge %s", body["client_id"], body["edge"])
        _rounds().collection.gone({body["client_id"]}, "disconnected")
    return jsonify({"disconnected": bool(gone)})


@bp.post("/edge/status")
@admin_required
def edge_status() -> Any:
    body = _edge_body("edge", "client_id", "sid", "status")
    meshfed = _meshfed()
    session = meshfed.registry.get(body["client_id"])
    if session is None or session.sid != body["sid"]:
        return error(404, "no_session", f"{body['client_id']!r} has no session with that sid")
    apply_status(body["client_id"], body["status"], meshfed.store, meshfed.registry, _rounds().collection)
    return jsonify({"updated": True})


@bp.get("/edge/client/<client_id>")
@admin_required
def edge_client(client_id: str) -> Any:
    """A registered client's pinned key and examples: what an edge verifies its updates with."""
    row = _meshfed().store.client(client_id) if CLIENT_ID_RE.fullmatch(client_id) else None
    if row is None:
        return error(404, "unknown_client", f"no key is pinned for {client_id[:64]!r}")
    return jsonify({"client_id": row["id"], "public_key": row["public_key"], "num_examples": row["num_examples"]})


@bp.post("/sync")
def sync() -> Any:
    """Receive one packed, signed offline contribution (shared/protocol.py pack_sync)."""
    rounds, limits = _rounds(), _meshfed().limits
    try:
        header, payload = unpack_sync(read_signed_body("sync-per-address"))
        verified = authenticate(rounds.store, header, payload)
    except UpdateRefused as exc:
        return _refusal_reply(exc)
    try:
        limits.hit("sync-per-client", header.client_id)
        return jsonify(rounds.offer_contribution(verified))
    except UpdateRefused as exc:
        return _refusal_reply(exc, header.client_id)
