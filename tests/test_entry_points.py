"""run_server.py and run_client.py as a person meets them: --help at once, with every flag explained and its
default shown, and logs that stay quiet when clients and servers come and go."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

import run_client
import run_server
from shared.cluster import die_with_parent, free_port, wait_until
from tests.conftest import ROOT


def imported_modules(script: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `script` with `args` under -X importtime: (the finished process, the top-level modules it imported)."""
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", r.stderr, flags=re.M)
    assert names, r.stderr[-2000:]
    return r, {name.split(".")[0] for name in names}


@pytest.mark.parametrize("script", ["run_server.py", "run_client.py"])
def test_help_and_a_mistyped_flag_load_neither_torch_nor_flask(script):
    r, modules = imported_modules(script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
    assert not modules & {"torch", "flask", "flask_socketio", "gunicorn", "torchvision", "opacus"}, modules
    r, modules = imported_modules(script, "--port" if script == "run_server.py" else "--seed", "x")
    assert r.returncode == 2 and "invalid int value: 'x'" in r.stderr
    assert "torch" not in modules


@pytest.mark.parametrize("module,shown", [
    (run_server, ["--port PORT", "(default: 5000)", "--max-update-mb", "(default: 32.0)", "(default 'fashion-mnist')"]),
    (run_client, ["(default: http://127.0.0.1:5000)", "--holdout HOLDOUT", "(default: 0.2)"])])
def test_every_flag_has_help_and_its_default_is_shown(module, shown):
    parser = module.build_parser()
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            assert action.help and len(action.help) > 8, f"{action.option_strings} has no help"
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for words in shown:
        assert words in " ".join(text.split()), words


def test_the_client_drops_engineios_lost_connection_error(caplog):
    import client.node  # noqa: F401 (installs the filter)
    with caplog.at_level(logging.INFO):
        logging.getLogger("engineio.client").error("packet queue is empty, aborting")
        logging.getLogger("engineio.client").error("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_clients_and_a_server_coming_and_going_log_no_errors(cluster, fmnist):
    cluster.start_server("--dataset", "fashion-mnist", "--model", "mlp", "--min-clients", "1", "--eval-limit", "200")
    cluster.wait_ready()
    flags = ["--dataset", "fashion-mnist", "--model", "mlp", "--max-samples", "200"]
    first = cluster.start_client("c0", *flags)
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 1, 120, "c0 online")
    cluster.kill(first, signal.SIGTERM)  # its websocket closes: werkzeug used to log the close frame as an error
    cluster.start_client("c1", *flags)
    cluster.wait_until(lambda: "client c1 connected" in (cluster.workdir / "server.log").read_text(), 120, "c1")
    server_log = (cluster.workdir / "server.log").read_text()
    assert "client c0 disconnected" in server_log
    assert " ERROR " not in server_log and "Bad request syntax" not in server_log, server_log

    cluster.kill(cluster.server)  # kill -9: the client keeps retrying, and says so once, not every retry
    client_log = cluster.workdir / "c1.log"
    cluster.server = None
    cluster.wait_until(lambda: "not reachable; still trying" in client_log.read_text(), 30, "c1 to say so")
    time.sleep(12)  # python-socketio retries after 1, 2, 4, 5, 5... s: several times in this sleep
    text = client_log.read_text()
    assert text.count("not reachable; still trying") == 1 and text.count("disconnected from the server") == 1, text
    assert "connection refused" not in text and "packet queue is empty" not in text and " ERROR " not in text, text


def test_the_readmes_by_hand_commands_survive_a_kill_9_of_the_server_with_no_tokens_passed(tmp_path, fmnist):
    """README, "Running it by hand": a server that makes and keeps its own tokens, clients given the enrollment
    token through the environment, Start with curl; then kill -9 and the same command again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHFED_")} | {"PYTHONUNBUFFERED": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = ["--dataset", "fashion-mnist", "--model", "mlp"]

    def start(script: str, log: str, *args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env={**env, **extra},
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def server(log: str) -> subprocess.Popen:
        return start("run_server.py", log, *data, "--num-rounds", "4", "--min-clients", "2", "--state-dir", "state",
                     "--port", str(port), "--eval-limit", "500")

    procs = [server("server-1.log")]
    try:
        tokens_file = tmp_path / "state" / "tokens.json"
        wait_until(lambda: tokens_file.exists() and requests.get(url + "/healthz", timeout=2).ok, 60, "the server")
        tokens = json.loads(tokens_file.read_text())
        for i in range(2):
            procs.append(start("run_client.py", f"c{i}.log", "--client-id", f"c{i}", "--num-clients", "2",
                               "--client-index", str(i), "--max-samples", "300", "--server-address", url, *data,
                               MESHFED_ENROLLMENT_TOKEN=tokens["enrollment"]))
        admin = {"Authorization": f"Bearer {tokens['admin']}"}
        status = lambda: requests.get(url + "/api/status", timeout=5).json()  # noqa: E731
        wait_until(lambda: status()["clients_online"] == 2, 120, "both clients")
        assert requests.post(url + "/api/start", headers=admin, timeout=10).ok
        wait_until(lambda: status()["completed_round"] >= 1, 120, "round 1")
        procs[0].kill()  # kill -9: no handler runs
        procs[0].wait(timeout=10)
        procs[0] = server("server-2.log")  # the same command; it finds its tokens and its run in state/
        wait_until(lambda: status()["state"] == "finished", 240, "the resumed run to finish")
        rounds = requests.get(url + "/api/metrics", timeout=5).json()["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4] and rounds[-1]["clients"] == ["c0", "c1"]
        assert "resuming run" in (tmp_path / "server-2.log").read_text()
        first_log, second_log = (tmp_path / "server-1.log").read_text(), (tmp_path / "server-2.log").read_text()
        assert "printed this once" in first_log and "printed this once" not in second_log  # kept, not made anew
        for i in range(2):
            assert procs[1 + i].poll() is None  # the clients never exited
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_setup_shows_pips_progress_and_offers_the_cpu_only_torch():
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and not [line for line in installs if re.search(r"\s-q\b|--quiet", line)], installs
    cpu = "--index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1"
    assert cpu in setup and 'if [ -n "${MESHFED_CPU_TORCH:-}" ]' in setup
    requirements = (ROOT / "requirements.txt").read_text()
    assert "torch==2.14.1 " in requirements and "torchvision==0.29.1 " in requirements  # the versions offered
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "MESHFED_CPU_TORCH=1" in readme and cpu.split(" torch==")[0] in readme
    r = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "setup.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
