"""The dashboard: /dashboard Socket.IO without a browser, then a real headless Chromium."""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from app import create_app
from app.config import RunConfig, ServerConfig
from tests.conftest import ROOT

ADMIN = "dash-admin"
NS = "/dashboard"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def app(tmp_path):
    app = create_app(ServerConfig(state_dir=str(tmp_path), admin_token=ADMIN, enrollment_token="e",
                                  run=RunConfig(dataset="synthetic", model="mlp")))
    yield app
    app.extensions["meshfed"].store.close()


def sio(app, **kwargs):
    return app.extensions["meshfed"].socketio.test_client(app, namespace=NS, **kwargs)


def csrf_token(browser) -> str:
    """The CSRF token of the login form, as a browser gets it."""
    page = browser.get("/login").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_unauthenticated_dashboard_is_refused(app):
    assert not sio(app).is_connected(NS)
    assert not sio(app, auth={"token": "wrong"}).is_connected(NS)
    page = app.test_client().get("/")
    assert page.status_code == 302 and page.headers["Location"].endswith("/login")
    browser = app.test_client()
    assert browser.post("/login", data={"token": "nope", "csrf_token": csrf_token(browser)}).status_code == 401


def test_token_in_url_sets_an_httponly_cookie_that_admits_the_socket(app):
    browser = app.test_client()
    r = browser.get(f"/?token={ADMIN}")
    assert r.status_code == 302 and "token" not in r.headers["Location"]
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert browser.get("/").status_code == 200
    client = sio(app, flask_test_client=browser)
    assert client.is_connected(NS)
    client.emit("request_status", namespace=NS)
    names = {m["name"] for m in client.get_received(NS)}
    assert {"status_update", "clients_update", "models_update", "system_history"} <= names


def test_invalid_config_gets_field_errors_over_socketio(app):
    client = sio(app, auth={"token": ADMIN})
    ack = client.emit("update_config", {"num_rounds": 0, "lr": "x", "dataset": "imagenet"}, namespace=NS,
                      callback=True)
    assert ack["ok"] is False and set(ack["fields"]) == {"num_rounds", "lr", "dataset"}
    ack = client.emit("update_config", {"num_rounds": "4"}, namespace=NS, callback=True)
    assert ack["ok"] is True and ack["config"]["num_rounds"] == 4
    ack = client.emit("stop_training", namespace=NS, callback=True)
    assert ack == {"ok": False, "error": "no run is active"}


def test_control_events_of_a_revoked_login_are_refused_and_do_nothing(app):
    """The socket stays connected (say the revocation raced its connect): every control event still checks
    the login, so none of them acts."""
    client = sio(app, auth={"token": ADMIN})
    assert client.is_connected(NS)
    meshfed = app.extensions["meshfed"]
    meshfed.admin_sessions._revoked.update(meshfed.admin_sessions._sockets)  # revoke every login, keep the socket
    for event, data in (("start_training", {}), ("update_config", {"num_rounds": 9}), ("stop_training", None)):
        ack = client.emit(event, data, namespace=NS, callback=True)
        assert ack == {"ok": False, "error": "unauthorized: log in with the admin token"}, (event, ack)
    assert meshfed.runs.status()["active"] is False and meshfed.runs.run_config.num_rounds != 9


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is required for the browser test; run `bash .ci/setup.sh`")
    return path


def test_dashboard_in_chromium_live_rounds_start_stop_and_screenshots(cluster):
    from playwright.sync_api import sync_playwright

    cluster.start_server("--dataset", "synthetic", "--num-rounds", "200", "--min-clients", "2",
                         "--max-batches", "5", "--eval-limit", "300")
    for i in range(2):
        cluster.start_client(f"c{i}", "--dataset", "synthetic", "--partition", "iid", "--num-clients", "2",
                             "--client-index", str(i), "--max-samples", "300")
    cluster.wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    foreign: list[str] = []

    def on_request(request):
        url = urlparse(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in ("127.0.0.1", "localhost"):
            foreign.append(request.url)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", on_request)

            page.goto(cluster.url + "/")
            assert page.url.endswith("/login")
            page.fill("#token", cluster.admin_token)
            page.click("#login")
            page.wait_for_function("() => document.querySelectorAll('#clients-body tr[data-client]').length === 2",
                                   timeout=30_000)
            page.wait_for_function("() => document.getElementById('state').textContent === 'idle'", timeout=10_000)

            page.click("#control-tab")
            page.click("#btn-start")
            page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length >= 1", timeout=90_000)
            assert int(page.text_content("#round")) >= 1
            statuses = page.eval_on_selector_all(".client-status", "els => els.map(e => e.textContent)")
            assert len(statuses) == 2 and set(statuses) <= {"training", "idle"}, statuses
            page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length >= 3", timeout=90_000)
            page.click("button[data-bs-target='#tab-overview']")
            page.wait_for_selector("#tab-overview.show.active")
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / "dashboard-1440.png"), full_page=True)

            # The Mesh tab draws every registered client as a node; nobody synced offline work in this run.
            page.click("button[data-bs-target='#tab-mesh']")
            page.wait_for_selector("#tab-mesh.show.active")
            nodes = page.eval_on_selector_all("#mesh-graph circle", "els => els.map(e => e.getAttribute('data-client'))")
            assert sorted(nodes) == ["c0", "c1"], nodes
            assert "No client has synced offline work yet." in page.text_content("#mesh-body")

            # A second browser that arrives mid-run sees the whole history, not only new points.
            late = browser.new_page(viewport={"width": 1440, "height": 900})
            late.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            late.goto(f"{cluster.url}/?token={cluster.admin_token}")
            late.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length >= 3", timeout=10_000)
            late.close()

            page.click("#control-tab")
            page.click("#btn-stop")
            page.wait_for_function("() => document.getElementById('state').textContent === 'stopped'", timeout=60_000)
            assert cluster.status()["state"] == "stopped"

            # The form is made from the configuration's schema: one field per setting, in its order.
            from app.config import config_schema
            fields = page.eval_on_selector_all("#config-fields [name]", "els => els.map(e => e.name)")
            assert fields == list(config_schema()["properties"]), fields
            page.fill("#cfg-num_rounds", "-3")
            page.click("#btn-save")
            page.wait_for_selector("#cfg-num_rounds.is-invalid", timeout=10_000)
            assert "1 to 100000" in page.text_content("#err-num_rounds")

            page.set_viewport_size({"width": 390, "height": 844})
            page.click("button[data-bs-target='#tab-overview']")
            page.wait_for_selector("#tab-overview.show.active")
            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)
            # On a phone the page never scrolls sideways: the tables do, inside their cards, and the tab bar does
            page.click("button[data-bs-target='#tab-clients']")
            assert page.eval_on_selector("#clients-body td", "e => getComputedStyle(e).whiteSpace") == "nowrap"
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.click("button[data-bs-target='#tab-models']")
            rollback = page.locator("#models-body button", has_text="Rollback").first
            rollback.scroll_into_view_if_needed()
            box = rollback.bounding_box()
            assert rollback.is_visible() and 0 <= box["x"] and box["x"] + box["width"] <= 390, box
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.click("button[data-bs-target='#tab-system']")  # past the right edge: the tab bar scrolls to it
            page.wait_for_selector("#tab-system.show.active")
        finally:
            browser.close()
    assert errors == [], errors
    assert foreign == [], foreign
    assert Path(ARTIFACTS / "dashboard-1440.png").stat().st_size > 10_000


def test_alert_rules():
    from dashboard.monitor import Monitor

    seen = []
    m = Monitor(lambda event, data: seen.append((event, data)))
    for r, acc in enumerate([0.5, 0.6, 0.55], start=1):
        m.observe("metrics_update", {"round": r, "accuracy": acc})
    assert seen == []  # one drop is not an alert
    m.observe("metrics_update", {"round": 4, "accuracy": 0.5})
    assert [d["kind"] for e, d in seen if e == "alert"] == ["accuracy"]
    for _ in range(3):
        m.observe("update_refused", {"client_id": "c7", "reason": "non_finite"})
    alerts = [d for e, d in seen if e == "alert"]
    assert alerts[-1]["kind"] == "client" and "c7" in alerts[-1]["message"] and "non_finite" in alerts[-1]["message"]
    m.observe("update_refused", {"client_id": "c7", "reason": "non_finite"})
    assert len([1 for e, _ in seen if e == "alert"]) == 2  # raised once, not on every refusal
    assert m.sample()["memory_percent"] > 0 and m.snapshot()["samples"]


def test_a_page_of_another_origin_cannot_drive_the_dashboard_with_the_admins_cookie(cluster, tmp_path):
    """Cross-site WebSocket hijacking: the admin is logged in (SameSite=Strict cookie); a page on another port of
    127.0.0.1 is the same *site*, so Chromium sends that cookie along. The server's Origin check must refuse it,
    while the dashboard's own page, same origin, connects."""
    import http.server
    import threading

    from playwright.sync_api import sync_playwright
    from shared.cluster import free_port

    cluster.start_server("--dataset", "synthetic", "--model", "mlp")
    cluster.wait_ready()
    (tmp_path / "evil.html").write_text(f"""<!doctype html>
<script src="{cluster.url}/static/vendor/socketio/socket.io.min.js"></script>
<script>
window.outcome = "pending";
const s = io("{cluster.url}/dashboard", {{transports: ["websocket"], reconnection: false, withCredentials: true}});
s.on("connect", () => s.emit("stop_training", (ack) => {{ window.outcome = "connected: " + JSON.stringify(ack); }}));
s.on("connect_error", (e) => {{ window.outcome = "refused: " + e.message; }});
</script>""")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{cluster.url}/?token={cluster.admin_token}")  # logged in: the cookie is set
                page.wait_for_function("() => document.getElementById('state').textContent === 'idle'", timeout=20_000)
                attacker = context.new_page()  # same browser, same cookie jar
                attacker.goto(f"http://127.0.0.1:{evil.server_address[1]}/evil.html")
                attacker.wait_for_function("() => window.outcome !== 'pending'", timeout=20_000)
                outcome = attacker.evaluate("() => window.outcome")
            finally:
                browser.close()
    finally:
        evil.shutdown()
        evil.server_close()
    assert outcome.startswith("refused"), outcome


@contextlib.contextmanager
def _dashboard_tab(cluster, errors: list[str], tab: str, idle: bool = True):
    """A headless Chromium logged in to the dashboard (once the server is idle, if `idle`), on tab `tab`
    ('privacy', 'clients', ...); console errors go to `errors`."""
    from playwright.sync_api import sync_playwright

    cluster.wait_ready()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{cluster.url}/?token={cluster.admin_token}")
            if idle:
                page.wait_for_function("() => document.getElementById('state').textContent === 'idle'",
                                       timeout=20_000)
            page.click(f"button[data-bs-target='#tab-{tab}']")
            yield page
        finally:
            browser.close()


def test_the_privacy_tab_shows_epsilon_growing_live(cluster):
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "8", "--min-clients", "2",
                         "--dp", "client", "--noise-multiplier", "4.0", "--target-epsilon", "3", "--eval-limit", "200",
                         "--max-batches", "3")
    errors: list[str] = []
    with _dashboard_tab(cluster, errors, "privacy") as page:
        for i in range(2):
            cluster.start_client(f"c{i}", "--dataset", "synthetic", "--model", "mlp", "--partition", "iid",
                                 "--num-clients", "2", "--client-index", str(i), "--max-samples", "200")
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        seen = []
        for n in (1, 2, 3):  # each round adds a point, live
            page.wait_for_function(f"() => (window.meshfed.charts.privacy.data.datasets[0]?.data || [])"
                                   f".filter((v) => v != null).length >= {n}", timeout=60_000)
            seen.append(page.evaluate("() => window.meshfed.charts.privacy.data.datasets[0].data.filter("
                                      "(v) => v != null).slice(-1)[0]"))
        assert seen == sorted(seen) and len(set(seen)) == 3, seen
        assert page.text_content("#privacy-mode").startswith("dp: client, budget epsilon 3")
        assert "epsilon" in page.text_content("#privacy-spent")
        page.wait_for_function("() => document.getElementById('state').textContent === 'finished'", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-privacy.png"), full_page=True)
    assert errors == [], errors
    rounds = cluster.rounds()  # the budget stopped it before its 8 rounds (q = 1, sigma 4: 5 rounds fit in 3)
    assert 3 <= len(rounds) < 8 and rounds[-1]["privacy"]["epsilon"] <= 3
    assert "privacy budget" in (cluster.workdir / "server.log").read_text()


def test_the_privacy_tab_shows_each_secure_rounds_stages_live(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "2", "--min-clients", "3", "--secure-aggregation", "secagg+",
                         "--eval-limit", "200", "--max-batches", "3")
    errors: list[str] = []
    with _dashboard_tab(cluster, errors, "privacy") as page:
        assert "in the clear" in page.text_content("#secure-mode")
        cluster.start_clients("c", 3, *synthetic, "--partition", "iid", "--num-clients", "3", "--max-samples", "200")
        cluster.wait_until(lambda: cluster.status()["clients_online"] == 3, 60, "three clients")
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        page.wait_for_function("() => document.querySelectorAll('#secure-body tr').length === 2", timeout=60_000)
        first = page.locator("#secure-body tr").first.locator("td")  # the newest round first
        assert first.nth(0).text_content() == "2" and first.nth(1).text_content() == "3 / 3 / 3"
        assert first.nth(2).text_content() == "0" and "KiB" in first.nth(5).text_content()
        assert "Updates arrive masked" in page.text_content("#secure-mode")
        page.screenshot(path=str(ARTIFACTS / "dashboard-secure.png"), full_page=True)
        # Rollback asks first: dismissed, nothing happens; accepted, a new version is the current one
        page.wait_for_function("() => document.getElementById('state').textContent === 'finished'", timeout=30_000)
        page.click("button[data-bs-target='#tab-models']")
        before = cluster.api("GET", "/api/models").json()["current"]
        asked: list[str] = []
        page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
        page.locator("#models-body button", has_text="Rollback").last.click()
        page.wait_for_timeout(1000)
        assert asked and "Roll the global model back" in asked[0]
        assert cluster.api("GET", "/api/models").json()["current"] == before
        page.once("dialog", lambda d: d.accept())
        page.locator("#models-body button", has_text="Rollback").last.click()
        cluster.wait_until(lambda: cluster.api("GET", "/api/models").json()["current"] != before, 10,
                           "the rollback, once confirmed")
    assert errors == [], errors


def test_the_clients_table_shows_each_training_clients_progress(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "cnn"]  # the CNN: tens of seconds of batches
    cluster.start_server(*synthetic, "--num-rounds", "1", "--min-clients", "2", "--round-timeout", "600", "--start")
    for i, epochs in enumerate((40, 60)):
        cluster.start_client(f"c{i}", *synthetic, "--local-epochs", str(epochs), "--max-samples", "1000",
                             "--partition", "iid", "--num-clients", "2", "--client-index", str(i))
    errors: list[str] = []
    with _dashboard_tab(cluster, errors, "clients", idle=False) as page:
        page.wait_for_function("() => document.querySelector('#clients-body progress')?.value > 0", timeout=60_000)
        first = page.eval_on_selector("#clients-body progress", "e => [e.value, e.max, e.title]")
        page.wait_for_function(f"() => document.querySelector('#clients-body progress')?.value > {first[0]}",
                               timeout=30_000)  # it moves, live
        assert first[1] in (40 * 25, 60 * 25) and first[2].startswith("round 1: ")  # 800 to train on, batch 32
        page.wait_for_function("() => [...document.querySelectorAll('#clients-body progress')].length === 2 && "
                               "[...document.querySelectorAll('#clients-body progress')].every("
                               "(e) => e.value > 0.25 * e.max)", timeout=60_000)
        assert re.fullmatch(r"· deadline in \d+ s \(600 s a round\)", page.text_content("#deadline"))
        page.screenshot(path=str(ARTIFACTS / "dashboard-progress.png"), full_page=True)
    assert errors == [], errors
    assert cluster.api("POST", "/api/stop", admin=True).ok


def test_charts_the_rounds_deadline_and_why_a_round_was_partial(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "1", "--min-clients", "2", "--round-timeout", "15",
                         "--quorum", "0.5", "--eval-limit", "200", "--max-batches", "3")
    errors: list[str] = []
    with _dashboard_tab(cluster, errors, "overview") as page:
        # Empty charts: the loss axis starts at 0 (not -1), the participation axis counts whole clients
        assert page.evaluate("() => window.meshfed.charts.loss.scales.y.min") == 0
        cluster.start_client("c0", *synthetic, "--partition", "iid", "--num-clients", "2", "--client-index", "0",
                             "--max-samples", "200")
        cluster.start_client("c1", *synthetic, "--partition", "iid", "--num-clients", "2", "--client-index", "1",
                             "--max-samples", "200", "--delay", "60")  # trains, then waits past the deadline
        cluster.wait_until(lambda: cluster.status()["clients_online"] == 2, 60, "two clients")
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        page.wait_for_function("() => /deadline in \\d+ s/.test(document.getElementById('deadline').textContent)",
                               timeout=30_000)
        status = cluster.status()
        assert status["open_round"]["deadline_in"] <= 15 and status["open_round"]["deadline_at"] > 0
        page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length === 1", timeout=60_000)
        assert page.text_content("#round-note") == "round 1: clients 1/2: c1 missed the 15 s deadline"
        page.wait_for_function("() => document.getElementById('deadline').textContent === ''",
                               timeout=10_000)  # no round open any more
        charts = page.evaluate("""() => {
            const c = window.meshfed.charts, acc = c.accuracy.getDatasetMeta(0).data[0];
            return {x: acc.x, left: c.accuracy.chartArea.left, right: c.accuracy.chartArea.right,
                    ticks: c.clients.scales.y.ticks.map((t) => t.value),
                    titles: ["accuracy", "loss", "duration", "clients"].map((k) => c[k].options.scales.x.title.text),
                    system: c.system.data.datasets.map((d) => d.label)}; }""")
        assert charts["x"] > charts["left"] + 0.25 * (charts["right"] - charts["left"]), charts  # not on the y-axis
        assert all(float(t).is_integer() for t in charts["ticks"]), charts["ticks"]
        assert charts["titles"] == ["round"] * 4
        assert charts["system"] == ["host CPU %", "server process CPU % (of the host)", "host memory %"]
        assert re.fullmatch(r"last round, float32 \(\d+ KiB\) over bytes per client: upload 1\.0x, download 1\.0x "
                            r"\(0 downloads as coded steps\)", page.text_content("#bandwidth-note"))
    assert errors == [], errors
    (row,) = cluster.rounds()
    assert row["why_dropped"] == {"c1": "missed the 15 s deadline"} and row["dropped"] == ["c1"]
    assert "clients 1/2: c1 missed the 15 s deadline" in (cluster.workdir / "server.log").read_text()


def test_start_after_a_finished_run_continues_and_earlier_runs_stay_browsable(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "2", "--min-clients", "1", "--eval-limit", "200",
                         "--max-batches", "3", "--start")
    cluster.start_client("c0", *synthetic, "--max-samples", "200")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 90, "the first run to finish")
    first, finished_at = cluster.status()["run_id"], cluster.status()["model_version"]
    errors: list[str] = []
    with _dashboard_tab(cluster, errors, "control", idle=False) as page:
        page.wait_for_function("() => document.getElementById('state').textContent === 'finished'", timeout=20_000)
        page.fill("#cfg-num_rounds", "3")
        page.click("#btn-save")
        page.wait_for_function("() => document.getElementById('config-message').textContent === 'saved'")
        page.click("#btn-start")  # "fresh model" unticked: the finished run's model trains on in a new run
        page.wait_for_function("() => /continued: the current model/.test("
                               "document.getElementById('control-message').textContent)", timeout=20_000)
        assert page.text_content("#config-message") == ""  # no stale "saved" once the run started
        page.wait_for_function("() => document.getElementById('state').textContent === 'finished'", timeout=90_000)
        second = cluster.status()
        assert second["run_id"] != first and second["began"] == {
            "how": "continued", "from_version": finished_at,
            "why": f"the current model (version {finished_at}) trains on"}
        versions = cluster.api("GET", "/api/models").json()["versions"]
        assert [v["source"] for v in versions].count("init") == 1  # no fresh model was made
        assert min(v["version"] for v in versions if v["run_id"] == second["run_id"]) == finished_at + 1

        # The earlier run stays browsable: pick it, its two rounds come back; the current run's three after it
        page.click("button[data-bs-target='#tab-overview']")
        page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length === 3", timeout=20_000)
        options = page.eval_on_selector_all("#run-select option", "els => els.map((e) => e.value)")
        assert options == [second["run_id"], first]
        page.select_option("#run-select", first)
        page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length === 2", timeout=10_000)
        page.select_option("#run-select", second["run_id"])
        page.wait_for_function("() => window.meshfed.charts.accuracy.data.labels.length === 3", timeout=10_000)
    assert errors == [], errors
    runs = cluster.api("GET", "/api/runs").json()["runs"]
    assert [(r["id"], r["status"], r["completed_round"], r["from_version"]) for r in runs] == [
        (second["run_id"], "finished", 3, finished_at), (first, "finished", 2, None)]
    assert len(cluster.api("GET", f"/api/metrics?run_id={first}").json()["rounds"]) == 2
    fresh = cluster.api("POST", "/api/start", admin=True, json={"new_run": True}).json()["status"]["began"]
    assert fresh["how"] == "fresh" and fresh["why"] == "a new run was asked for"
