"""`everloop deploy k8s --target-rps`: the arithmetic from a measured cost to replicas and CPU."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
import yaml

from everloop.deploy import Measurement, size


def _measured(request_ms: float, rss_mib: float = 300.0) -> Measurement:
    return Measurement(model_version=3, request_ms=request_ms, batch_row_ms=0.02, requests=500, rss_mib=rss_mib,
                       machine="test machine")


@pytest.mark.parametrize("rps, request_ms, cores, replicas, cpu_m", [
    (500, 1.2, 0.6, 2, 500),      # 0.6 cores / 0.6 busy = 1 core on 2 pods (the minimum): 500m each
    (2000, 1.2, 2.4, 4, 1000),    # 4 cores: 4 one-core pods
    (2100, 1.2, 2.52, 5, 850),    # 4.2 cores: 5 pods of 840m, rounded up to 850m
    (10, 0.5, 0.005, 2, 100),     # next to nothing: the 100m floor
])
def test_replicas_and_cpu_follow_from_the_measured_cost(rps, request_ms, cores, replicas, cpu_m):
    sizing = size(rps, _measured(request_ms))
    assert sizing.cores == pytest.approx(cores)
    assert (sizing.replicas, sizing.cpu_request_m, sizing.cpu_limit_m) == (replicas, cpu_m, 1000)
    # the autoscaler's target is the busy share the pods were sized for: at the target rate, each pod
    # uses that share of its request (or less, where a floor or the minimum of replicas applies)
    assert sizing.cores / sizing.replicas <= sizing.utilisation * sizing.cpu_request_m / 1000 + 1e-9


def test_memory_follows_the_measured_peak():
    sizing = size(100, _measured(1.0, rss_mib=300.0))
    assert (sizing.memory_request_mi, sizing.memory_limit_mi) == (384, 768)  # 300 x 1.25 = 375 -> 384Mi
    assert size(100, _measured(1.0, rss_mib=50.0)).memory_request_mi == 256  # the floor


def test_target_rps_measures_here_and_writes_the_arithmetic(everloop, trained, tmp_path):
    project, _, store = trained
    tables = store.tables

    def counts() -> list[int]:
        with store.engine.connect() as conn:
            return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
                    for t in (tables.prediction_batches, tables.service_stats)]

    before = counts()
    run = everloop("deploy", "k8s", "-p", str(project), "-o", str(tmp_path / "k8s"), "--target-rps", "400",
                   "--json")
    assert run.code == 0, run.err
    sizing = json.loads(run.out)["sizing"]
    m = sizing["measurement"]
    assert m["model_version"] == 1 and m["request_ms"] > 0 and m["requests"] >= 25
    assert sizing["cores"] == pytest.approx(400 * m["request_ms"] / 1000)
    expected = size(400, Measurement(**m))
    assert (sizing["replicas"], sizing["cpu_request_m"]) == (expected.replicas, expected.cpu_request_m)

    text = (tmp_path / "k8s" / "deployment.yaml").read_text()
    deployment = yaml.safe_load(text)
    assert deployment["spec"]["replicas"] == sizing["replicas"]
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == f"{sizing['cpu_request_m']}m"
    assert resources["requests"]["memory"] == f"{sizing['memory_request_mi']}Mi"
    assert f"# CPU at the target: 400 x {m['request_ms']:.3f} ms = {sizing['cores']:.3f} cores" in text.replace(
        "#   ", "# ")
    hpa = yaml.safe_load((tmp_path / "k8s" / "hpa.yaml").read_text())["spec"]
    assert hpa["minReplicas"] == sizing["replicas"]
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert counts() == before  # measuring logged no prediction and no request count in the store
