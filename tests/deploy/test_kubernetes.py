"""`tuneloop deploy k8s` and `tuneloop deploy kserve` from a real registry version, offline:

- k8s: `kubectl kustomize` builds overlays/gpu, overlays/cpu (and either with the in-flight autoscaling component);
  every built object of the core and autoscaling APIs passes kubernetes-validate's strict schemas of the newest
  Kubernetes it ships; the ServiceMonitor (a Prometheus Operator CRD kubernetes-validate has no schema for) is
  checked against the Service it scrapes: selector, namespace and port name.
- kserve: the InferenceService and the LLMInferenceService deserialised strictly by KServe's own Python models
  (kserve_check.py in .venv-kserve: unknown keys and wrong types fail), the LLMInferenceService's spec against the
  CRD's schema (kserve_crd_schema.py), the PVC loader against kubernetes-validate.
- golden: every engine container runs deploy.json's engine_commands, which are `tuneloop serve`'s vLLM /
  llama-server command lines for the same version.
- bad input: contradictory replica bounds and a storage URI KServe cannot download from are refused, naming the
  setting.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from tests.deploy.conftest import KSERVE_PYTHON, REFERENCE, Version, deploy_fails
from tests.deploy.kserve_crd_schema import model_spec_validator, strict_validator
from tuneloop.artifacts.deployment import DeployManifest
from tuneloop.config_file import load_config
from tuneloop.deploy.bundle import ADAPTERS_DIR, BASE_DIR
from tuneloop.serve.engines.base import adapter_chat_template
from tuneloop.serve.engines.vllm import VLLM_SERVER_MODULE, vllm_arguments

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
KSERVE_CHECK = Path(__file__).with_name("kserve_check.py")
KUBERNETES_VERSION = latest_version()
APP = "extractor"  # Kubernetes objects are named after the registry model, whatever the version


def kustomize(folder: Path) -> list[dict[str, Any]]:
    if not Path(KUBECTL).exists():
        pytest.skip("kubectl is not installed here: `kubectl kustomize` cannot build the overlays")
    built = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [document for document in yaml.safe_load_all(built.stdout) if document]


def strictly_valid(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [document["kind"] for document in documents]
    assert len(kinds) == len(set(kinds)), kinds
    return {document["kind"]: document for document in documents}


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in pod_spec["containers"] if item["name"] == name)


def check_service_monitor(monitor: dict[str, Any], service: dict[str, Any]) -> None:
    """What a cluster with the Prometheus Operator would need of the ServiceMonitor: its API, that it selects the
    Service in the same namespace and scrapes a port the Service names."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}


def check_overlay(documents: list[dict[str, Any]], manifest: DeployManifest, device: str, gateway: bool) -> None:
    objects = by_kind(documents)
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}
    for document in documents:
        assert document["metadata"]["name"] == APP and document["metadata"]["namespace"] == "default"
        if document["kind"] != "ServiceMonitor":
            strictly_valid(document)
    deployment, service = objects["Deployment"], objects["Service"]
    check_service_monitor(objects["ServiceMonitor"], service)

    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    engine = container(pod["spec"], "engine")
    # Golden: the container runs deploy.json's engine command line, and nothing is appended to it.
    assert engine["command"] == manifest.engine_commands[device] and "args" not in engine
    assert engine["image"] == manifest.images[device]
    served = next(item for item in pod["spec"]["containers"] if "http" in {p["name"] for p in item["ports"]})
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    if gateway:
        assert served["name"] == "gateway" and served["image"] == manifest.images["gateway"]
        assert served["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert served["args"] == ["-c", f"/etc/tuneloop/gateway-{device}.yaml"]
        secret = served["env"][0]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "tuneloop-api-keys", "key": "TUNELOOP_API_KEYS"}
    else:
        assert served is engine and engine["readinessProbe"]["httpGet"]["path"] == "/health"
        assert [item["name"] for item in pod["spec"]["containers"]] == ["engine"]
    if device == "gpu":
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
        assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in json.dumps(pod) and "nodeSelector" not in pod["spec"]
    autoscaler = objects["HorizontalPodAutoscaler"]["spec"]
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP}
    assert autoscaler["metrics"][0]["resource"]["name"] == "cpu"


def served_vllm_command(config_path: Path, out: Path, manifest: DeployManifest, root: str) -> list[str]:
    """The command line `tuneloop serve` builds for this version (serve's own vllm_arguments), with the model
    folder where the container sees it."""
    config = load_config(config_path)
    local = out / "model"
    adapters = {name: local / ADAPTERS_DIR / folder for name, folder in manifest.model.adapters.items()}
    template = adapter_chat_template(local / BASE_DIR, list(adapters.values()))
    arguments = vllm_arguments(
        config.serve,
        manifest.model.base_model,
        f"{root}/{BASE_DIR}",
        {name: f"{root}/{path.relative_to(local).as_posix()}" for name, path in adapters.items()},
        manifest.model.lora_rank,
        config.serve.max_model_len,
        None if template is None else f"{root}/{template.relative_to(local).as_posix()}",
        for_this_machine=False,
    )
    return ["python3", "-m", VLLM_SERVER_MODULE, *arguments, "--host", "0.0.0.0", "--port", "8000"]


@pytest.mark.slow
def test_k8s_overlays_build_and_validate(deploy_folder, registered_version: Version) -> None:
    out, manifest = deploy_folder("k8s")
    assert manifest.model_root == "/models" and set(manifest.engine_commands) == {"gpu", "cpu"}
    assert manifest.engine_commands["gpu"] == served_vllm_command(registered_version.config, out, manifest, "/models")
    assert manifest.engine_commands["cpu"][0] == "/app/llama-server"
    assert "/models/gguf/base.gguf" in manifest.engine_commands["cpu"]
    for name in ("README.md", "Dockerfile", "prometheus-adapter.yaml", "base/kustomization.yaml"):
        assert name in manifest.files and (out / name).exists(), name
    readme = (out / "README.md").read_text()
    assert all(manifest.commands[step] in readme for step in ("build", "push", "deploy", "call", "scale"))
    # The gateway image reaches the engine in its own pod.
    gateway_config = yaml.safe_load((out / "gateway" / "gateway-gpu.yaml").read_text())
    assert gateway_config["serve"]["remote_urls"] == ["http://127.0.0.1:8000/v1"]

    for device in ("gpu", "cpu"):
        check_overlay(kustomize(out / "overlays" / device), manifest, device, gateway=True)

    # The optional component: the HPA also targets requests in flight per pod, the metric prometheus-adapter's
    # rule publishes.
    with_component = out / "overlays" / "gpu-in-flight"
    with_component.mkdir()
    (with_component / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../gpu"], "components": ["../../components/in-flight-autoscaling"]})
    )
    documents = kustomize(with_component)
    autoscaler = by_kind(documents)["HorizontalPodAutoscaler"]
    strictly_valid(autoscaler)
    pods_metric = autoscaler["spec"]["metrics"][1]["pods"]
    assert pods_metric["metric"]["name"] == "tuneloop_requests_in_flight"
    assert pods_metric["target"] == {"type": "AverageValue", "averageValue": "32"}
    rule = yaml.safe_load((out / "prometheus-adapter.yaml").read_text())["rules"]["custom"][0]
    assert (
        rule["name"]["as"] == "tuneloop_requests_in_flight" and "tuneloop:num_requests_running" in rule["seriesQuery"]
    )

    # The validation is real: a misspelt field and a wrong type are both refused.
    deployment = by_kind(documents)["Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            strictly_valid(broken)


@pytest.mark.slow
def test_k8s_without_gateway_serves_the_engine(deploy_folder) -> None:
    out, manifest = deploy_folder("k8s", "--set", "deploy.gateway=false")
    for device in ("gpu", "cpu"):
        check_overlay(kustomize(out / "overlays" / device), manifest, device, gateway=False)
    assert "vllm:num_requests_running" in (out / "prometheus-adapter.yaml").read_text()


def kserve_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert KSERVE_PYTHON.exists(), "the KServe SDK is missing: run `make deploy-tools`"
    return subprocess.run([KSERVE_PYTHON, KSERVE_CHECK, *map(str, paths)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_kserve_resources_match_kserve_models(deploy_folder, registered_version: Version, tmp_path: Path) -> None:
    out, manifest = deploy_folder("kserve", "--min-replicas", "0", "--max-replicas", "4")
    storage = "pvc://tuneloop-models/extractor-v1"
    assert manifest.model_root == "/mnt/models" and set(manifest.engine_commands) == {"gpu"}
    command = manifest.engine_commands["gpu"]
    assert command == served_vllm_command(registered_version.config, out, manifest, "/mnt/models")
    assert not (out / "model" / "gguf").exists()  # GPU only: no GGUF conversion

    isvc_path, llm_path = out / "inferenceservice.yaml", out / "llminferenceservice.yaml"
    checked = kserve_check(isvc_path, llm_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == [
        {"kind": "InferenceService", "name": APP, "class": "V1beta1InferenceService"},
        {"kind": "LLMInferenceService", "name": APP, "class": "V1alpha2LLMInferenceService"},
    ]

    isvc = yaml.safe_load(isvc_path.read_text())
    predictor = isvc["spec"]["predictor"]
    engine = predictor["containers"][0]
    assert engine["name"] == "kserve-container" and engine["command"] == command and "args" not in engine
    assert {"name": "STORAGE_URI", "value": storage} in engine["env"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 4)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 32)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"

    llm = yaml.safe_load(llm_path.read_text())
    errors = [f"{list(error.absolute_path)}: {error.message}" for error in strict_validator().iter_errors(llm)]
    assert not errors, errors
    model = llm["spec"]["model"]
    adapter_errors = [
        error.message for adapter in model["lora"]["adapters"] for error in model_spec_validator().iter_errors(adapter)
    ]
    assert not adapter_errors, adapter_errors
    assert model["uri"] == storage and model["name"] == manifest.model.base_model
    assert model["lora"]["adapters"] == [{"name": REFERENCE, "uri": f"{storage}/adapters/extractor-v1"}]
    assert model["lora"]["maxRank"] == manifest.model.lora_rank
    main = llm["spec"]["template"]["containers"][0]
    # The engine names its own --lora-modules, so the controller injects none (workload_lora.go).
    assert main["name"] == "main" and main["command"] == command and "--lora-modules" in command
    scaling = llm["spec"]["scaling"]
    assert (scaling["minReplicas"], scaling["maxReplicas"], scaling["keda"]["idleReplicaCount"]) == (1, 4, 0)
    assert scaling["keda"]["triggers"][0]["metadata"]["threshold"] == "32"

    # The default storage is a PVC: its claim and loader validate as plain Kubernetes, the README copies model/.
    claim = yaml.safe_load((out / "model-claim.yaml").read_text())
    loader = yaml.safe_load((out / "model-loader.yaml").read_text())
    for document in (claim, loader):
        strictly_valid(document)
    assert claim["metadata"]["name"] == "tuneloop-models" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "tuneloop-models"
    assert "kubectl -n default cp model/. tuneloop-models-loader:/data/extractor-v1" in manifest.commands["upload"]
    assert manifest.commands["upload"] in (out / "README.md").read_text()

    # The checks are real: a misspelt field, a wrong type, an invalid CRD value are each refused.
    broken_isvc = copy.deepcopy(isvc)
    broken_isvc["spec"]["predictor"]["minReplica"] = 1
    broken_isvc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken_isvc))
    refused = kserve_check(tmp_path / "broken.yaml")
    assert refused.returncode == 1
    assert "predictor.minReplica: unknown field of V1beta1PredictorSpec" in refused.stderr
    assert "containerPort: expected int" in refused.stderr
    broken_llm = copy.deepcopy(llm)
    broken_llm["spec"]["model"]["lora"]["maxRank"] = 0
    broken_llm["spec"]["template"]["containers"][0]["comand"] = ["x"]
    messages = [error.message for error in strict_validator().iter_errors(broken_llm)]
    assert any("minimum of 1" in message for message in messages) and any("comand" in message for message in messages)


@pytest.mark.slow
def test_kserve_static_replicas_and_object_storage(deploy_folder) -> None:
    out, manifest = deploy_folder(
        "kserve", "--min-replicas", "2", "--max-replicas", "2", "--set", "deploy.storage_uri=s3://models/extractor/v1/"
    )
    llm = yaml.safe_load((out / "llminferenceservice.yaml").read_text())
    assert llm["spec"]["replicas"] == 2 and "scaling" not in llm["spec"]
    assert not [error.message for error in strict_validator().iter_errors(llm)]
    assert llm["spec"]["model"]["lora"]["adapters"][0]["uri"] == "s3://models/extractor/v1/adapters/extractor-v1"
    assert manifest.commands["upload"] == "aws s3 sync model/ s3://models/extractor/v1/"
    assert not (out / "model-loader.yaml").exists() and not (out / "model-claim.yaml").exists()


@pytest.mark.slow
def test_bad_deploy_settings_are_refused_naming_the_setting(registered_version: Version, tmp_path: Path) -> None:
    output = deploy_fails(registered_version, tmp_path, "k8s", REFERENCE, "--min-replicas", "3", "--max-replicas", "1")
    assert "deploy.min_replicas (3) exceeds deploy.max_replicas (1)" in output
    output = deploy_fails(
        registered_version, tmp_path, "kserve", REFERENCE, "--force", "--set", "deploy.storage_uri=ftp://host/models"
    )
    assert "deploy.storage_uri 'ftp://host/models'" in output and "pvc://CLAIM/PATH" in output
