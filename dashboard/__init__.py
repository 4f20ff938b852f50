"""Everything a browser sees. For now: one status page that polls the REST API."""
from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("dashboard", __name__, template_folder="templates")


@bp.get("/")
def index() -> str:
    return render_template("status.html")
