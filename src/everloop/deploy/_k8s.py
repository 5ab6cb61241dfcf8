"""`everloop deploy k8s`: plain Kubernetes manifests and a kustomization for the service and the loop.

The Deployment runs `everloop serve` (one worker per pod; replicas and an autoscaler add capacity)
with readiness on `/ready` (a verified model is loaded), liveness on `/health`, and a startupProbe
that gives the first model load time. Pods run as the image's non-root user on a read-only root
filesystem: the store's local cache (`/app/.everloop`) and `/tmp` are emptyDir volumes, the project
file comes from a ConfigMap, the database URL and the tokens from a Secret that the manifests name
but never hold. A CronJob runs `everloop loop --once`; the store's lease keeps one loop acting at a
time even if two jobs overlap, and `concurrencyPolicy: Forbid` keeps them from overlapping at all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from everloop.deploy._context import APP_DIR, PORT, UID, has_registry, image_name, prepare_output, secret_notes
from everloop.deploy._docker import DeployResult, serve_command
from everloop.deploy._sizing import Sizing
from everloop.errors import EverloopError

FILES = ("configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "cronjob.yaml")
SCHEDULE = "*/15 * * * *"
LOOP_COMMAND = ["everloop", "loop", "--once"]
# What the pods read from the Secret: (key, required). Optional keys may be left out of it.
SECRET_KEYS = (("EVERLOOP_DB_URL", True), ("EVERLOOP_API_TOKEN", False), ("EVERLOOP_ADMIN_TOKEN", False),
               ("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False))
# Settings of this machine's environment that the pods get from the ConfigMap when set here.
CONFIG_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def k8s_name(project: str) -> str:
    """A project name as a Kubernetes object name (lower-case letters, digits and '-', at most 40
    characters, so that suffixes such as '-secrets' keep it within the limits)."""
    name = re.sub(r"[^a-z0-9-]+", "-", project.lower()).strip("-")[:40].strip("-")
    return name or "everloop"


def write_k8s(project: Path, spec: Any, output: Path, *, image: str | None = None, replicas: int | None = None,
              sizing: Sizing | None = None, artifacts_url: str | None = None, schedule: str = SCHEDULE,
              force: bool = False) -> DeployResult:
    """Write the manifests and `kustomization.yaml` into `output`. `sizing` (from `size`) sets the
    replicas and resources, with its arithmetic in deployment.yaml's header; without it, `replicas`
    (default 2) and default resources. `artifacts_url` defaults to `EVERLOOP_ARTIFACTS_URL`, else a
    placeholder to fill in; a `file://` URL's folder is mounted from the PersistentVolumeClaim
    `<name>-artifacts`. Notes name what to fill in or create (a loopback endpoint, the claim). Raises
    EverloopError when `output` is not empty and `force` is False, or when a `file://` URL names a
    folder the pods already use."""
    from everloop.spec import SPEC_FILE

    name = k8s_name(spec.name)
    image = image or image_name(spec.name)
    notes: list[str] = secret_notes(spec)
    url = artifacts_url or os.environ.get("EVERLOOP_ARTIFACTS_URL")
    if not url:
        url = f"s3://CHANGE-ME/{name}"
        notes.append(f"EVERLOOP_ARTIFACTS_URL is not set here: configmap.yaml holds the placeholder {url}; put "
                     "the shared artifact store there (or pass --artifacts-url)")
    db = os.environ.get("EVERLOOP_DB_URL", "")
    if not db.startswith("postgresql"):
        notes.append(f"replicas share one PostgreSQL: put its URL in the Secret {name}-secrets as EVERLOOP_DB_URL "
                     "(see kustomization.yaml)")
    config = {"EVERLOOP_ARTIFACTS_URL": url} | {k: os.environ[k] for k in CONFIG_ENV if os.environ.get(k)}
    for key, value in config.items():
        host = _loopback(value)
        if host:
            notes.append(f"{key} points at {host}: inside a pod that is the pod itself; set it in configmap.yaml to "
                         "the address the cluster reaches that server at (e.g. http://minio.NAMESPACE.svc:9000)")
    shared = _shared_folder(url)
    if shared:
        notes.append(f"EVERLOOP_ARTIFACTS_URL is the folder {shared}: the pods mount the PersistentVolumeClaim "
                     f"{name}-artifacts there (deployment.yaml, cronjob.yaml); create that claim on shared storage "
                     "(ReadWriteMany, e.g. NFS) before applying, or use an s3:// URL")
    config[SPEC_FILE] = (project / SPEC_FILE).read_text(encoding="utf-8")
    prepare_output(output, force)  # after the checks above: a refused URL leaves no folder behind
    if sizing is not None:
        replicas = sizing.replicas
        resources = {"requests": {"cpu": f"{sizing.cpu_request_m}m", "memory": f"{sizing.memory_request_mi}Mi"},
                     "limits": {"cpu": f"{sizing.cpu_limit_m}m", "memory": f"{sizing.memory_limit_mi}Mi"}}
        sized = sizing.comment()
    else:
        replicas = max(replicas or 2, 1)
        resources = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
        sized = ["Resources are defaults, not measured: 'everloop deploy k8s --target-rps R' sizes them from",
                 "the production model's cost on this machine."]
    labels = {"app.kubernetes.io/name": "everloop", "app.kubernetes.io/instance": name}
    serve_labels = labels | {"app.kubernetes.io/component": "serve"}
    manifests = {
        "configmap.yaml": (["The project file and the non-secret settings, read by the service and the loop."],
                           _meta("v1", "ConfigMap", f"{name}-config", labels) | {"data": config}),
        "deployment.yaml": (sized, _deployment(name, image, replicas, resources, serve_labels, config, shared)),
        "service.yaml": ([f"The service's address inside the cluster: http://{name}/predict"],
                         _service(name, serve_labels)),
        "hpa.yaml": (["Adds replicas when the pods' CPU passes the utilisation they were sized for."],
                     _hpa(name, replicas, serve_labels, sizing)),
        "pdb.yaml": (["Node drains take one replica at a time."],
                     _meta("policy/v1", "PodDisruptionBudget", name, serve_labels)
                     | {"spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(serve_labels)}}}),
        "cronjob.yaml": ([f"The loop: monitor, and retrain, gate and promote when the triggers fire, on a "
                          f"schedule ({schedule}).",
                          "One turn per job; the store's lease keeps a second loop from acting.",
                          "A failed Job is a candidate refused by the gate or a retraining that failed (exit 1),",
                          "or a turn that could not run (exit 2): worth an alert (docs/deploy.md, When the loop's",
                          "Job fails)."],
                         _cronjob(name, image, schedule, labels | {"app.kubernetes.io/component": "loop"},
                                  config, shared)),
    }
    for file, (comment, body) in manifests.items():
        _dump(output / file, comment, body)
    repository, tag = _split_image(image)
    _dump(output / "kustomization.yaml", _how_to(name, image, output), {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(FILES),
        "images": [{"name": repository, "newName": repository} | tag]})
    files = sorted(p.name for p in output.iterdir())
    return DeployResult(output, files, image, serve_command(), notes,
                        sizing.to_dict() if sizing is not None else None)


def _split_image(image: str) -> tuple[str, dict[str, str]]:
    """An image reference as (repository, {"newTag": tag} or {"digest": digest} or {}), as kustomize's
    `images` takes it; a registry's port (`localhost:5000/app`) is not a tag."""
    named, at, digest = image.partition("@")
    head, colon, tag = named.rpartition(":")
    repository, tag = (head, tag) if colon and "/" not in tag else (named, "")
    return repository, {"digest": digest} if at else {"newTag": tag} if tag else {}


def _loopback(url: str) -> str | None:
    """The host of `url` when it is this machine (localhost, 127.x, ::1, 0.0.0.0), else None."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname
        if host is None:
            return None
        if host == "localhost" or host.endswith(".localhost"):
            return host
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, or not a URL
        return None
    return host if address.is_loopback or address.is_unspecified else None


def _shared_folder(url: str) -> str | None:
    """The folder of a `file://` artifacts URL (a shared volume the pods must mount), else None.
    Raises EverloopError when that folder is one the pods already use (/, /app, /tmp, the cache)."""
    from urllib.parse import unquote, urlsplit

    if not url.startswith("file:"):
        return None
    folder = "/" + unquote(urlsplit(url).path).strip("/")
    taken = (f"{APP_DIR}/everloop.yaml", f"{APP_DIR}/.everloop", "/tmp")
    if any(f"{t}/".startswith(f"{folder.rstrip('/')}/") for t in taken):
        raise EverloopError(f"artifacts URL {url}: {folder} is or holds a folder the pods already use "
                            f"({', '.join(taken)}); put the shared store in a folder of its own, e.g. "
                            "file:///mnt/everloop")
    return folder


def _meta(api: str, kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "labels": labels}}


def _selector(labels: dict[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component")}


def _env(name: str, config: dict[str, str]) -> list[dict[str, Any]]:
    """The container's environment: OpenMP threads = the CPU limit, settings from the ConfigMap,
    secrets from the Secret (by reference)."""
    from everloop.spec import SPEC_FILE

    env: list[dict[str, Any]] = [
        # scikit-learn's OpenMP would otherwise start a thread per core of the node, not of the pod
        {"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}}]
    env += [{"name": key, "valueFrom": {"configMapKeyRef": {"name": f"{name}-config", "key": key}}}
            for key in config if key != SPEC_FILE]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": f"{name}-secrets", "key": key}
                                        | ({} if required else {"optional": True})}}
            for key, required in SECRET_KEYS]
    return env


def _pod(name: str, container: dict[str, Any], labels: dict[str, str], config: dict[str, str],
         shared: str | None) -> dict[str, Any]:
    """A pod template: the container as the image's non-root user, read-only root, writable cache and /tmp;
    the PersistentVolumeClaim `<name>-artifacts` at `shared` (a file:// artifact store's folder) if given."""
    from everloop.spec import SPEC_FILE

    volumes = [{"name": "project", "configMap": {"name": f"{name}-config",
                                                 "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
               # the store's read-through cache: artifacts from the shared store, compiled models
               {"name": "store-cache", "emptyDir": {"sizeLimit": "2Gi"}},
               {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    mounts = [{"name": "project", "mountPath": f"{APP_DIR}/{SPEC_FILE}", "subPath": SPEC_FILE, "readOnly": True},
              {"name": "store-cache", "mountPath": f"{APP_DIR}/.everloop"},
              {"name": "tmp", "mountPath": "/tmp"}]
    if shared:
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": f"{name}-artifacts"}})
        mounts.append({"name": "artifacts", "mountPath": shared})
    container = container | {
        "env": _env(name, config),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts}
    return {"metadata": {"labels": labels}, "spec": {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes}}


def _deployment(name: str, image: str, replicas: int, resources: dict[str, Any], labels: dict[str, str],
                config: dict[str, str], shared: str | None) -> dict[str, Any]:
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 3,
                "failureThreshold": failures}

    container = {
        "name": "serve", "image": image, "imagePullPolicy": "IfNotPresent", "command": serve_command(),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": resources,
        # up to 5 minutes for the first model load (downloaded from the shared store) before liveness counts
        "startupProbe": probe("/health", 5, 60),
        "readinessProbe": probe("/ready", 5, 2),  # 503 until a verified model is loaded
        "livenessProbe": probe("/health", 10, 3),
    }
    pod = _pod(name, container, labels, config, shared)
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                      "prometheus.io/path": "/metrics"}
    pod["spec"]["terminationGracePeriodSeconds"] = 30
    return _meta("apps/v1", "Deployment", name, labels) | {"spec": {
        "replicas": replicas,
        "selector": {"matchLabels": _selector(labels)},
        # a new pod is ready (model loaded) before an old one goes: no failed request during a rollout
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": pod}}


def _service(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return _meta("v1", "Service", name, labels) | {"spec": {
        "type": "ClusterIP", "selector": _selector(labels),
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def _hpa(name: str, replicas: int, labels: dict[str, str], sizing: Sizing | None) -> dict[str, Any]:
    utilisation = round(100 * sizing.utilisation) if sizing is not None else 60
    return _meta("autoscaling/v2", "HorizontalPodAutoscaler", name, labels) | {"spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicas": replicas, "maxReplicas": 2 * replicas,
        "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": utilisation}}}],
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}


def _cronjob(name: str, image: str, schedule: str, labels: dict[str, str],
             config: dict[str, str], shared: str | None) -> dict[str, Any]:
    container = {"name": "loop", "image": image, "imagePullPolicy": "IfNotPresent", "command": LOOP_COMMAND,
                 # training runs on two threads (everloop.train), so two cores at most
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}
    pod = _pod(name, container, labels, config, shared)
    pod["spec"]["restartPolicy"] = "Never"
    return _meta("batch/v1", "CronJob", f"{name}-loop", labels) | {"spec": {
        "schedule": schedule,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"metadata": {"labels": labels}, "spec": {
            # a failed turn (exit 1: a candidate refused, a retraining that failed) waits for the next
            # schedule rather than retraining again at once
            "backoffLimit": 0, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 86400,
            "template": pod}}}}


def _how_to(name: str, image: str, output: Path) -> list[str]:
    keys = ", ".join(k for k, required in SECRET_KEYS if not required)
    repository = _split_image(image)[0]
    push = (["1. Build the image (everloop deploy docker) and push it as", f"     {image}",
             "   `images` below names it: change newTag (or newName) there to deploy another build."]
            if has_registry(image) else
            ["1. Build and push the image (everloop deploy docker), and point `images` below at it:",
             f"     newName: registry.example.com/{repository}"])
    return [
        "Written by `everloop deploy k8s`. Plain manifests; this kustomization applies them together.",
        *push,
        "2. Create the Secret the pods read (never committed). EVERLOOP_DB_URL is required;",
        f"   optional: {keys}.",
        f"     kubectl create secret generic {name}-secrets \\",
        "       --from-literal=EVERLOOP_DB_URL=postgresql+psycopg://USER:PASSWORD@HOST:5432/everloop \\",
        "       --from-literal=EVERLOOP_ADMIN_TOKEN=$(openssl rand -hex 32)",
        "3. Check the shared artifact store's URL in configmap.yaml, then apply and watch:",
        f"     kubectl apply -k {output}",
        f"     kubectl rollout status deployment/{name}",
        "See docs/deploy.md.",
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the project file) as YAML blocks, readable in the manifest; no anchors
    (a label set used twice is written out twice)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def _dump(path: Path, comment: list[str], body: dict[str, Any]) -> None:
    text = "".join(f"# {line}\n" if line else "#\n" for line in comment)
    path.write_text(text + yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=120))
