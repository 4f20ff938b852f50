"""The Kubernetes manifests (containers/k8s): each overlay rendered by `kubectl kustomize`, every object validated
against the Kubernetes schemas (kubernetes-validate, strict), and what the objects say checked against the code:
the flags parse, probes and scrape annotations hit real endpoints, tokens and state are mounted where the flags
point, and the clients' partition count is their replica count."""
from __future__ import annotations

import shutil
import subprocess

import flask
import kubernetes_validate
import pytest
import yaml

import run_client
import run_server
from app.ops import bp as ops_bp
from tests.conftest import ROOT

K8S = ROOT / "containers" / "k8s"
VERSION = "1.33.0"  # the Kubernetes API version whose schemas the manifests are checked against


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is required (Debian's kubernetes-client); run `bash .ci/setup.sh`")
    r = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def parse_server(args: list[str]):
    """run_server.py's flags as its parser reads them (parse_args would also read the token files, which exist
    only in the pod)."""
    return run_server.build_parser().parse_args(args)


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def mounts(workload: dict) -> dict[str, dict]:
    """mount path -> the volume (or volume claim template) mounted there."""
    spec = workload["spec"]
    volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
    volumes |= {t["metadata"]["name"]: {"claim": t} for t in spec.get("volumeClaimTemplates", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container(workload)["volumeMounts"]}


def secret_file(workload: dict, path: str, secret: str) -> str:
    """The key of Secret `secret` that the file at `path` holds (the mount must come from that secret)."""
    directory, name = path.rsplit("/", 1)
    volume = mounts(workload)[directory]["secret"]
    assert volume["secretName"] == secret
    items = {i["path"]: i["key"] for i in volume.get("items", [])}
    return items.get(name, name) if items else name


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_every_manifest_validates_and_agrees_with_the_code(overlay):
    docs = render(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    objects = by_name(docs)
    namespace = {"dev": "meshfed-dev", "production": "meshfed"}[overlay]
    assert all(d["metadata"]["namespace"] == namespace for d in docs)
    leader, web = objects[("StatefulSet", "meshfed-leader")], objects[("Deployment", "meshfed-web")]
    clients, redis = objects[("StatefulSet", "meshfed-client")], objects[("Deployment", "meshfed-redis")]
    services = {name: d for (kind, name), d in objects.items() if kind == "Service"}
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if overlay == "dev":  # generated (dev-only literals), referenced under its hashed name
        (secret,) = secrets
        tokens = secret["metadata"]["name"]
        assert tokens.startswith("meshfed-tokens-") and set(secret["data"]) == {"admin-token", "enrollment-token"}
    else:  # production never ships a token: the operator creates meshfed-tokens
        assert secrets == [] and container(leader)["image"] == "meshfed-server:1.0"
        tokens = "meshfed-tokens"
    app = flask.Flask("routes")
    app.register_blueprint(ops_bp)
    routes = {rule.rule for rule in app.url_map.iter_rules()}  # the ops endpoints the probes and Prometheus hit

    for workload in (leader, web, clients, redis):  # every container asks for and is bounded in CPU and memory
        resources = container(workload)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])

    leader_args = parse_server(container(leader)["args"])
    assert leader_args.role == "leader" and leader_args.wsgi == "gunicorn" and leader["spec"]["replicas"] == 1
    assert "claim" in mounts(leader)[leader_args.state_dir]  # state on a PVC: a new pod resumes the run
    for flag, key in (("admin_token_file", "admin-token"), ("enrollment_token_file", "enrollment-token")):
        assert secret_file(leader, getattr(leader_args, flag), tokens) == key
    for workload, args in ((leader, leader_args), (web, parse_server(container(web)["args"]))):
        c = container(workload)
        (port,) = c["ports"]
        assert port["containerPort"] == args.port and args.host == "0.0.0.0"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        notes = workload["spec"]["template"]["metadata"]["annotations"]
        assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(args.port),
                         "prometheus.io/path": "/metrics"}
        assert {"/healthz", "/readyz", "/metrics"} <= routes
        assert args.message_queue == f"redis://meshfed-redis:{services['meshfed-redis']['spec']['ports'][0]['port']}/0"
    web_args = parse_server(container(web)["args"])
    leader_port = services["meshfed-leader"]["spec"]["ports"][0]["port"]
    assert web_args.role == "follower" and web_args.leader_url == f"http://meshfed-leader:{leader_port}"

    client_args = run_client.build_parser().parse_args(container(clients)["args"])
    assert client_args.server_address == f"http://meshfed-leader:{leader_port}" and client_args.client_index == -1
    assert client_args.num_clients == clients["spec"]["replicas"]  # one partition per pod
    assert "claim" in mounts(clients)[client_args.key_dir]  # a pod keeps its key: the server pinned it
    assert secret_file(clients, client_args.enrollment_token_file, tokens) == "enrollment-token"
    client_secret = mounts(clients)["/run/secrets/meshfed"]["secret"]
    assert [i["key"] for i in client_secret["items"]] == ["enrollment-token"]  # never the admin token
    assert services["meshfed-client"]["spec"]["clusterIP"] == "None"  # stable pod names: the client ids


def test_the_validator_refuses_a_manifest_with_a_mistake():
    (leader,) = [d for d in render("dev") if d["metadata"]["name"] == "meshfed-leader" and d["kind"] == "StatefulSet"]
    leader["spec"]["replica"] = 2  # a typo of replicas
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(leader, VERSION, strict=True)


def test_a_statefulset_pod_trains_on_its_ordinals_partition():
    """--client-index -1 in the StatefulSet: meshfed-client-0..N-1 take partitions 0..N-1, one each."""
    assert [run_client.partition_index(f"meshfed-client-{i}", 10) for i in range(10)] == list(range(10))
    assert 0 <= run_client.partition_index("3f2a9c1b7d0e", 10) < 10  # a compose container id: hashed
    assert run_client.partition_index("lab-pc-12", 10) == run_client.partition_index("lab-pc-12", 10) < 10

