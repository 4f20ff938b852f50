"""Process-wide logging set-up for the run_*.py entry points."""
from __future__ import annotations

import json
import logging
import re
import sys


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the tag and exception, if any)."""

    def __init__(self, tag: str = ""):
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.tag:
            entry["tag"] = self.tag
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", log_file: str | None = None, fmt: str = "text", tag: str = "") -> None:
    """Log to stderr and, if given, to log_file; fmt 'text' (time level [tag] logger: message) or 'json'
    (with "tag"). The tag tells apart processes that share one stderr (run_client.py --local-clients)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    formatter = JsonFormatter(tag) if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)-7s " + (f"[{tag}] ".replace("%", "%%") if tag else "") + "%(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers, force=True)
    # werkzeug logs every HTTP request at INFO; keep it to warnings unless debugging.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)


class Redact(logging.Filter):
    """Keeps secrets out of every log line: the given values, and any token=... in a URL."""

    QUERY_TOKEN = re.compile(r"([?&]token=)[^&\s\"']+")

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.QUERY_TOKEN.sub(r"\1<redacted>", message)
        for secret in self.secrets:
            clean = clean.replace(secret, "<redacted>")
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact(*secrets: str) -> None:
    """From now on, every handler of the root logger writes `secrets` (and URL tokens) as <redacted>."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(Redact(list(secrets)))
