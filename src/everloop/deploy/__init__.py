"""Deployment files: the service's Docker build context, a training image that reproduces a run,
Kubernetes manifests for the service and the loop, and their sizing from a measurement."""

from everloop.deploy._docker import DeployResult, serve_command, write_docker, write_training
from everloop.deploy._k8s import LOOP_COMMAND, k8s_name, write_k8s
from everloop.deploy._sizing import Measurement, Sizing, measure, size

__all__ = ["DeployResult", "LOOP_COMMAND", "Measurement", "Sizing", "k8s_name", "measure", "serve_command",
           "size", "write_docker", "write_k8s", "write_training"]
