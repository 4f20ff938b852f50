"""Everything a browser sees: pages (this blueprint), the /dashboard Socket.IO namespace (events.py)
and the resource monitor with alerts (monitor.py).

Access works like Jupyter's: open /?token=<admin token> once (or type it into the login form) and an
HttpOnly session cookie admits the browser from then on; without it, pages redirect to the login
form and the /dashboard namespace refuses the connection.
"""
from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")


def token_ok(token: str | None) -> bool:
    expected = current_app.extensions["meshfed"].config.admin_token
    return bool(token) and hmac.compare_digest(str(token).encode(), expected.encode())


def is_admin() -> bool:
    return session.get("admin") is True


@bp.get("/")
def index() -> Any:
    if token_ok(request.args.get("token")):
        session["admin"] = True
        return redirect(url_for("dashboard.index"))  # drop the token from the address bar
    if not is_admin():
        return redirect(url_for("dashboard.login"))
    return render_template("dashboard.html")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        if token_ok(request.form.get("token")):
            session["admin"] = True
            return redirect(url_for("dashboard.index"))
        return render_template("login.html", error="That is not the admin token printed at server start."), 401
    return render_template("login.html", error=None)


@bp.post("/logout")
def logout() -> Any:
    session.clear()
    return redirect(url_for("dashboard.login"))
