"""A client's downloads of the global model: each version fetched once and checked against its sha256; in a run that
codes its downloads (download_compression int8, app/downlink.py), the coded step from the version held, applied and
checked the same way, else the whole model."""
from __future__ import annotations

import logging
import threading
from typing import Any

import requests
import urllib3

from shared.compression import DOWNLINK, apply_step, inflate
from shared.errors import UpdateRefused
from shared.protocol import decode_weights, encode_weights, sha256_hex

log = logging.getLogger("meshfed.client")


class ModelDownloads:
    def __init__(self, http: requests.Session, server: str, timeout: float, verify: str | bool):
        self.http, self.server, self.timeout, self.verify = http, server, timeout, verify
        self._lock = threading.Lock()  # one download per version, whoever asks first
        self.cache: tuple[int, str, dict] | None = None  # (version, sha256, weights) of the last download
        self.downloads = 0  # models fetched over HTTP (a prefetched one is not fetched again)
        self.last: tuple[int, int, bool] = (-1, 0, False)  # (version, bytes, as a coded step) of the last fetch
        self.coded = False  # the last train request said the run codes its downloads

    def fetch(self, version: int, sha256: str = "") -> tuple[str, dict]:
        """(sha256, weights) of global model `version`, downloaded once; `sha256`, if known, must match,
        so a cached model with the same version number from a server reset onto a fresh state dir is
        not trained from. Holding an earlier version, the client first asks for the coded step to this one
        (download_compression int8) and keeps the result only if it hashes to the model's sha256."""
        with self._lock:
            cached = self.cache
            if cached is None or cached[0] != version or (sha256 and cached[1] != sha256):
                # a step leads only forwards from ours, and only in a run that codes its downloads
                newer = cached is not None and cached[0] < version and self.coded
                rebuilt = self._fetch_step(cached, version) if newer else None
                if rebuilt is None:
                    body, digest = self._get(f"/api/model/{version}", version)
                    weights, self.last = decode_weights(body), (version, len(body), False)
                else:
                    weights, digest = rebuilt
                if sha256 and digest != sha256:
                    raise requests.RequestException(f"the server's model version {version} is not the one it "
                                                    "asked us to train (it changed meanwhile)")
                cached = self.cache = (version, digest, weights)
                self.downloads += 1
            return cached[1], cached[2]

    def _get(self, path: str, version: int) -> tuple[bytes, str]:
        """The body of GET `path` and the sha256 the server says it has (X-Model-SHA256), checked for a whole model;
        requests.HTTPError for a 4xx/5xx."""
        # stream=True and one raw read: Response.content would assemble the 6.65 MB from 10 KB
        # chunks, three times the CPU of the whole download here
        with self.http.get(f"{self.server}{path}", stream=True, timeout=self.timeout, verify=self.verify) as r:
            r.raise_for_status()
            try:
                body = r.raw.read(decode_content=True)
            except urllib3.exceptions.HTTPError as exc:  # the connection broke mid-body
                raise requests.ConnectionError(f"model version {version}: {exc}") from exc
            expected = r.headers.get("X-Model-SHA256", "")
        if "/delta" not in path and sha256_hex(body) != expected:
            raise requests.RequestException(f"model version {version} arrived corrupted")
        return body, expected

    def _fetch_step(self, cached: tuple[int, str, dict[str, Any]], version: int) -> tuple[dict[str, Any], str] | None:
        """(weights, sha256) of model `version` rebuilt from the cached one and the server's coded step, if the
        server has one and the result is the model it names (its sha256); None otherwise: then the whole model is
        downloaded."""
        try:
            body, expected = self._get(f"/api/model/{version}/delta?from={cached[0]}", version)
            limit = sum(v.nbytes for v in cached[2].values()) + (1 << 20)  # an int8 step is a quarter of that
            weights = apply_step(cached[2], decode_weights(inflate(body, limit)), DOWNLINK)
        except requests.RequestException:
            return None  # no step kept (not delta-coded, or too old a base), or it failed: the whole model
        except (ValueError, KeyError, UpdateRefused) as exc:  # a step that does not decode or fit
            log.warning("model version %d: the coded step did not apply (%s); downloading the whole model",
                        version, exc)
            return None
        digest = sha256_hex(encode_weights(weights))
        if digest != expected:
            log.warning("model version %d: the coded step from version %d does not rebuild the model (sha256); "
                        "downloading the whole model", version, cached[0])
            return None
        self.last = (version, len(body), True)
        return weights, digest

    def latest(self) -> tuple[int, dict] | None:
        """(version, weights) of the newest global model we downloaded, for the mesh."""
        cached = self.cache
        return None if cached is None else (cached[0], cached[2])
