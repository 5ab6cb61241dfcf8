"""`everloop deploy k8s`: every manifest validates offline against the newest Kubernetes API schema
kubernetes-validate ships, and its probes and commands name real routes and real CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml

from everloop.cli._app import app as cli_app
from everloop.serve import create_app

kubernetes_validate = pytest.importorskip("kubernetes_validate")
FILES = {"configmap.yaml", "cronjob.yaml", "deployment.yaml", "hpa.yaml", "pdb.yaml", "service.yaml"}


def _manifests(everloop, project: Path, output: Path, *args: str) -> tuple[dict, dict[str, dict]]:
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(output), "--json", *args)
    assert run.code == 0, run.err
    docs = {}
    for path in output.glob("*.yaml"):
        (doc,) = list(yaml.safe_load_all(path.read_text()))  # one object per file
        docs[path.name] = doc
    return json.loads(run.out), docs


def _containers(docs: dict[str, dict]) -> dict[str, tuple[dict, dict]]:
    """{kind: (pod spec, its one container)} of the Deployment and the CronJob."""
    deployment = docs["deployment.yaml"]["spec"]["template"]["spec"]
    cron = docs["cronjob.yaml"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {"Deployment": (deployment, deployment["containers"][0]), "CronJob": (cron, cron["containers"][0])}


def test_every_manifest_validates_against_the_kubernetes_api(everloop, project, tmp_path):
    out, docs = _manifests(everloop, project, tmp_path / "k8s")
    newest = kubernetes_validate.latest_version()
    for name in FILES:  # strict: an unknown (misspelled) field is an error too
        kubernetes_validate.validate(docs[name], newest, strict=True)
    kustomization = docs["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization" and set(kustomization["resources"]) == FILES
    assert set(out["files"]) == FILES | {"kustomization.yaml"}
    assert [d["kind"] for d in map(docs.get, sorted(FILES))] == ["ConfigMap", "CronJob", "Deployment",
                                                                 "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                                                 "Service"]


def test_probes_and_commands_are_real_routes_and_commands(everloop, trained, tmp_path):
    project, _, _ = trained
    _, docs = _manifests(everloop, project, tmp_path / "k8s")
    routes = {r.path for r in create_app(project, watch=False).routes if "GET" in getattr(r, "methods", ())}
    pods = _containers(docs)
    serve = pods["Deployment"][1]
    probes = {kind: serve[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    assert {p["path"] for p in probes.values()} <= routes
    assert {p["port"] for p in probes.values()} == {serve["ports"][0]["name"]}
    service = docs["service.yaml"]["spec"]
    assert service["ports"][0]["targetPort"] == serve["ports"][0]["name"]
    assert service["selector"].items() <= docs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"].items()

    group = typer.main.get_command(cli_app)
    for kind, (_, container) in pods.items():
        program, name, *args = container["command"]
        assert program == "everloop", kind
        command = group.get_command(typer.Context(group), name)
        assert command is not None, f"{kind}: no command 'everloop {name}'"
        params = command.make_context(name, list(args)).params  # unknown options would raise here
        if kind == "CronJob":
            assert name == "loop" and params["once"] is True
        else:
            assert name == "serve" and params["host"] == "0.0.0.0"
            assert params["port"] == serve["ports"][0]["containerPort"]
    assert docs["cronjob.yaml"]["spec"]["concurrencyPolicy"] == "Forbid"


def test_pods_are_locked_down_with_writable_cache_and_threads_at_the_cpu_limit(everloop, project, tmp_path):
    _, docs = _manifests(everloop, project, tmp_path / "k8s")
    for kind, (pod, container) in _containers(docs).items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert set(container["resources"]) == {"requests", "limits"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # the store's cache (.everloop under the project folder) and /tmp: the only writable places
        assert "emptyDir" in volumes[mounts["/app/.everloop"]] and "emptyDir" in volumes[mounts["/tmp"]]
        config = volumes[mounts["/app/everloop.yaml"]]["configMap"]
        assert config["name"] == docs["configmap.yaml"]["metadata"]["name"]
        env = {e["name"]: e.get("valueFrom") for e in container["env"]}
        assert env["OMP_NUM_THREADS"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}, kind
        assert env["EVERLOOP_DB_URL"]["secretKeyRef"] == {"name": "churn-secrets", "key": "EVERLOOP_DB_URL"}
        assert env["EVERLOOP_ADMIN_TOKEN"]["secretKeyRef"]["optional"] is True
        assert env["EVERLOOP_ARTIFACTS_URL"]["configMapKeyRef"]["key"] == "EVERLOOP_ARTIFACTS_URL"
    assert docs["configmap.yaml"]["data"]["everloop.yaml"] == (project / "everloop.yaml").read_text()


def test_secrets_are_referenced_never_written(everloop, project, tmp_path, monkeypatch):
    monkeypatch.setenv("EVERLOOP_ADMIN_TOKEN", "admin-s3cret")
    monkeypatch.setenv("EVERLOOP_DB_URL", "postgresql+psycopg://u:db-s3cret@db/everloop")
    monkeypatch.setenv("EVERLOOP_ARTIFACTS_URL", "s3://models/churn")
    out, docs = _manifests(everloop, project, tmp_path / "k8s")
    text = "".join(p.read_text() for p in (tmp_path / "k8s").iterdir())
    assert "s3cret" not in text and "Secret" not in {d["kind"] for d in docs.values()}
    assert docs["configmap.yaml"]["data"]["EVERLOOP_ARTIFACTS_URL"] == "s3://models/churn"
    assert out["notes"] == []  # both URLs were given: nothing to fill in
    _, docs = _manifests(everloop, project, tmp_path / "other", "--artifacts-url", "s3://b/p")
    assert docs["configmap.yaml"]["data"]["EVERLOOP_ARTIFACTS_URL"] == "s3://b/p"


def test_placeholders_are_named(everloop, project, tmp_path, monkeypatch):
    monkeypatch.delenv("EVERLOOP_ARTIFACTS_URL", raising=False)
    monkeypatch.delenv("EVERLOOP_DB_URL", raising=False)
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(tmp_path / "k8s"), "--replicas", "3")
    assert run.code == 0, run.err
    assert "s3://CHANGE-ME/churn" in run.out and "EVERLOOP_DB_URL" in run.out
    deployment = yaml.safe_load((tmp_path / "k8s" / "deployment.yaml").read_text())
    hpa = yaml.safe_load((tmp_path / "k8s" / "hpa.yaml").read_text())
    assert deployment["spec"]["replicas"] == 3
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)


@pytest.mark.parametrize("args, message", [
    (["--target-rps", "0"], "--target-rps 0: expected a rate above 0"),
    (["--target-rps", "inf"], "--target-rps inf: expected a rate above 0"),
    (["--target-rps", "10", "--replicas", "2"], "not both"),
    (["--schedule", "every hour"], "--schedule 'every hour': expected a cron schedule of 5 fields"),
])
def test_bad_arguments_are_one_line(everloop, project, tmp_path, args, message):
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(tmp_path / "k8s"), *args)
    assert run.code == 2 and message in run.err and "Traceback" not in run.err
    assert not (tmp_path / "k8s").exists()


def test_target_rps_without_a_production_model(everloop, project, tmp_path):
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(tmp_path / "k8s"), "--target-rps", "100")
    assert run.code == 2 and "no production model to measure" in run.err and "everloop promote" in run.err


@pytest.mark.parametrize("endpoint, host", [("http://127.0.0.1:5731", "127.0.0.1"),
                                            ("http://localhost:9000", "localhost"), ("http://[::1]:9000", "::1")])
def test_a_loopback_endpoint_is_written_with_a_note(everloop, project, tmp_path, monkeypatch, endpoint, host):
    monkeypatch.setenv("EVERLOOP_DB_URL", "postgresql+psycopg://u@db/everloop")
    monkeypatch.setenv("EVERLOOP_ARTIFACTS_URL", "s3://models/churn")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.store.svc:9000")  # a cluster address: no note
    out, docs = _manifests(everloop, project, tmp_path / "k8s")
    data = docs["configmap.yaml"]["data"]
    assert (data["AWS_ENDPOINT_URL_S3"], data["AWS_ENDPOINT_URL"]) == (endpoint, "http://minio.store.svc:9000")
    assert out["notes"] == [f"AWS_ENDPOINT_URL_S3 points at {host}: inside a pod that is the pod itself; set it in "
                            "configmap.yaml to the address the cluster reaches that server at (e.g. "
                            "http://minio.NAMESPACE.svc:9000)"]


def test_a_file_artifacts_url_mounts_a_named_claim_there(everloop, project, tmp_path, monkeypatch):
    monkeypatch.setenv("EVERLOOP_DB_URL", "postgresql+psycopg://u@db/everloop")
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    out, docs = _manifests(everloop, project, tmp_path / "k8s", "--artifacts-url", "file:///mnt/shared/")
    assert docs["configmap.yaml"]["data"]["EVERLOOP_ARTIFACTS_URL"] == "file:///mnt/shared/"
    for kind, (pod, container) in _containers(docs).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"] == {"claimName": "churn-artifacts"}, kind
    for name in ("deployment.yaml", "cronjob.yaml"):
        kubernetes_validate.validate(docs[name], kubernetes_validate.latest_version(), strict=True)
    (note,) = out["notes"]
    assert note.startswith("EVERLOOP_ARTIFACTS_URL is the folder /mnt/shared: the pods mount the "
                           "PersistentVolumeClaim churn-artifacts there") and "ReadWriteMany" in note

    _, docs = _manifests(everloop, project, tmp_path / "s3", "--artifacts-url", "s3://b/p")  # nothing to mount
    for pod, container in _containers(docs).values():
        assert {v["name"] for v in pod["volumes"]} == {"project", "store-cache", "tmp"}


@pytest.mark.parametrize("url", ["file:///tmp", "file:///app", "file:///"])
def test_a_file_artifacts_url_on_a_folder_the_pods_use_is_refused(everloop, project, tmp_path, url):
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(tmp_path / "k8s"), "--artifacts-url", url)
    assert run.code == 2 and f"artifacts URL {url}:" in run.err and "a folder of its own" in run.err
    assert not (tmp_path / "k8s").exists()


@pytest.mark.parametrize("image, name, tag", [
    ("registry.example.com/everloop-m1:0.1.0", "registry.example.com/everloop-m1", {"newTag": "0.1.0"}),
    ("localhost:5000/team/everloop-m1", "localhost:5000/team/everloop-m1", {}),  # a port, not a tag
    ("registry.example.com/m1:2@sha256:" + "a" * 64, "registry.example.com/m1", {"digest": "sha256:" + "a" * 64}),
])
def test_an_image_with_its_registry_is_named_once(everloop, project, tmp_path, image, name, tag):
    _, docs = _manifests(everloop, project, tmp_path / "k8s", "--image", image)
    assert docs["kustomization.yaml"]["images"] == [{"name": name, "newName": name} | tag]
    assert docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    comment = (tmp_path / "k8s" / "kustomization.yaml").read_text()
    assert f"push it as\n#      {image}\n" in comment and "example.com/registry.example.com" not in comment


def test_an_image_without_a_registry_gets_one_suggested(everloop, project, tmp_path):
    _, docs = _manifests(everloop, project, tmp_path / "k8s", "--image", "everloop-m1:0.1.0")
    assert docs["kustomization.yaml"]["images"] == [{"name": "everloop-m1", "newName": "everloop-m1",
                                                     "newTag": "0.1.0"}]
    assert "#      newName: registry.example.com/everloop-m1\n" in (tmp_path / "k8s" / "kustomization.yaml").read_text()


def test_a_literal_secret_in_the_project_file_is_named_in_the_notes(everloop, project, tmp_path, monkeypatch):
    """everloop.yaml is copied as it is into the ConfigMap: a webhook key written in it is pointed out,
    with the ${NAME} form to write instead."""
    monkeypatch.setenv("EVERLOOP_ARTIFACTS_URL", "s3://models/churn")
    monkeypatch.setenv("EVERLOOP_DB_URL", "postgresql+psycopg://u@db/everloop")
    spec_file = project / "everloop.yaml"
    body = yaml.safe_load(spec_file.read_text())
    body.setdefault("monitoring", {})["webhook"] = "https://hooks.example.com/alert?token=hook-s3cret"
    spec_file.write_text(yaml.safe_dump(body, sort_keys=False))
    out, _ = _manifests(everloop, project, tmp_path / "k8s")
    assert out["notes"] == ["everloop.yaml's monitoring.webhook holds a literal secret, and these files copy "
                            "everloop.yaml as it is: write it as https://hooks.example.com/alert?token="
                            "${EVERLOOP_WEBHOOK_TOKEN} and set the variable in the environment (a Secret on "
                            "Kubernetes)"]
