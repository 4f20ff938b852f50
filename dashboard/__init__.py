"""Everything a browser sees: pages (this blueprint), the /dashboard Socket.IO namespace (events.py)
and the resource monitor with alerts (monitor.py).

Access works like Jupyter's: open /?token=<admin token> once (or type it into the login form) and an
HttpOnly, SameSite=Strict session cookie admits the browser for SESSION_SECONDS; without it, pages redirect
to the login form and the /dashboard namespace refuses the connection. Each login is its own session id:
logging out revokes it (a copied cookie stops working too) and closes its dashboard sockets. The login
and logout forms carry a CSRF token (Flask-WTF).
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from typing import Any

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")
csrf = CSRFProtect()        # checks only where a view calls csrf.protect() (WTF_CSRF_CHECK_DEFAULT off)
SESSION_SECONDS = 12 * 3600  # a dashboard login lasts this long


class AdminSessions:
    """Dashboard logins: one id per login, revoked at logout (remembered in the store, if there is one)."""

    def __init__(self, store: Any = None):
        self._store = store
        self._lock = threading.Lock()
        self._revoked: set[str] = store.revoked_sessions() if store is not None else set()
        self._sockets: dict[str, set[str]] = {}  # login id -> its /dashboard Socket.IO sids

    @staticmethod
    def new() -> dict[str, Any]:
        return {"admin": True, "login": secrets.token_hex(16), "issued": time.time()}

    def active(self, data: Any) -> bool:
        """True iff `data` (a Flask session) is a login that is neither revoked nor expired."""
        login, issued = data.get("login"), data.get("issued")
        if data.get("admin") is not True or not isinstance(login, str) or not isinstance(issued, float):
            return False
        with self._lock:
            return login not in self._revoked and 0 <= time.time() - issued < SESSION_SECONDS

    def add_socket(self, login: str, sid: str) -> None:
        with self._lock:
            self._sockets.setdefault(login, set()).add(sid)

    def drop_socket(self, login: str | None, sid: str) -> None:
        with self._lock:
            self._sockets.get(login or "", set()).discard(sid)

    def revoke(self, login: str, issued: float) -> set[str]:
        """Revoke a login; returns its open socket ids (the caller closes them)."""
        with self._lock:
            self._revoked.add(login)
            sockets = self._sockets.pop(login, set())
        if self._store is not None:
            self._store.revoke_session(login, issued + SESSION_SECONDS)
        return sockets


def token_ok(token: Any) -> bool:
    expected = current_app.extensions["meshfed"].config.admin_token
    return isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode())


def sessions() -> AdminSessions:
    return current_app.extensions["meshfed"].admin_sessions


def is_admin() -> bool:
    return sessions().active(session)


def log_in() -> None:
    """Start a fresh login in this session (a new id, nothing carried over from before)."""
    session.clear()
    session.update(AdminSessions.new())
    session.permanent = True  # the cookie expires with the login (PERMANENT_SESSION_LIFETIME)


@bp.get("/")
def index() -> Any:
    if token_ok(request.args.get("token")):
        log_in()
        return redirect(url_for("dashboard.index"))  # drop the token from the address bar
    if not is_admin():
        return redirect(url_for("dashboard.login"))
    return render_template("dashboard.html")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        meshfed = current_app.extensions["meshfed"]
        meshfed.limits.hit("login-per-address", request.remote_addr)  # RateLimited -> 429 (app/server.py)
        csrf.protect()
        if token_ok(request.form.get("token")):
            log_in()
            return redirect(url_for("dashboard.index"))
        return render_template("login.html", error="That is not the admin token (state/tokens.json, or what the "
                                                   "server was given)."), 401
    return render_template("login.html", error=None)


@bp.post("/logout")
def logout() -> Any:
    csrf.protect()
    if is_admin():
        closed = sessions().revoke(session["login"], session["issued"])
        socketio = current_app.extensions["meshfed"].socketio
        for sid in closed:
            socketio.server.disconnect(sid, namespace="/dashboard")
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.app_errorhandler(CSRFError)
def on_csrf_error(exc: CSRFError) -> Any:
    return render_template("login.html", error=f"{exc.description} Reload the page and try again."), 400
