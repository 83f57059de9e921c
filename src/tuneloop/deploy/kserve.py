"""`tuneloop deploy kserve`: the version as a KServe InferenceService, and as the newer LLMInferenceService.

    inferenceservice.yaml     serving.kserve.io/v1beta1 InferenceService: a predictor container running vLLM with
                              `tuneloop serve`'s command line, the model downloaded from deploy.storage_uri to
                              /mnt/models by KServe's storage initializer, Knative autoscaling on concurrency
                              (minReplicas 0 scales to zero)
    llminferenceservice.yaml  serving.kserve.io/v1alpha2 LLMInferenceService (KServe's LLM API; v1alpha2 is its
                              storage version): the same container as its `main` workload, the adapters declared in
                              spec.model.lora, KEDA scaling on vLLM's requests in flight
    model-claim.yaml          pvc:// only: the PersistentVolumeClaim (shared by versions)
    model-loader.yaml         pvc:// only: a pod to `kubectl cp` model/ into it

Why a predictor container rather than `modelFormat: huggingface`: KServe concatenates the huggingface runtime's
own arguments (--model_name, --model_dir ...) before an InferenceService's `args`, so the engine would not run the
flags `tuneloop serve` runs. The custom container runs them verbatim; KServe still provides storage, autoscaling,
revisions and routing.
"""

from __future__ import annotations

import re
from typing import Any

from tuneloop.deploy import TargetOutput
from tuneloop.deploy.bundle import ADAPTERS_DIR
from tuneloop.deploy.context import ENGINE_PORT, DeployContext
from tuneloop.deploy.kubernetes import dump, gpu_resources, gpu_scheduling, http_probe
from tuneloop.errors import TuneloopError

MODEL_ROOT = "/mnt/models"  # where KServe's storage initializer puts storageUri's contents
NEEDS_GGUF = False
PREDICTOR_CONTAINER = "kserve-container"  # the name KServe looks for in a custom predictor
LLM_CONTAINER = "main"  # the LLMInferenceService presets' vLLM container
STORAGE_SCHEMES = ("s3", "gs", "pvc", "hf")
# What LLMInferenceService accepts for spec.model.lora.adapters[].uri that can also name a subfolder of storage_uri
# (hf:// names a whole repository).
LORA_SCHEMES = ("s3", "pvc")
ENGINE_ENV = [
    {"name": "HF_HUB_OFFLINE", "value": "1"},  # everything is in /mnt/models: never reach for the Hub
    {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
]
VERSIONS_PER_CLAIM = 3  # the default PVC holds this many versions of the model (rolling back needs the previous)
STORAGE_URI_RE = re.compile(r"^(?P<scheme>[a-z0-9+]+)://(?P<location>[^/\s]+)(?P<path>/\S*)?$")


def storage_uri(ctx: DeployContext) -> str:
    """deploy.storage_uri, or a PVC named tuneloop-models with the deployment under NAME-vN; checked here, where
    the error can name the setting, rather than by the cluster's storage initializer."""
    uri = (ctx.settings.storage_uri or f"pvc://tuneloop-models/{ctx.name}").rstrip("/")
    match = STORAGE_URI_RE.match(uri)
    if match is None or match["scheme"] not in STORAGE_SCHEMES:
        raise TuneloopError(
            f"deploy.storage_uri {uri!r} is not a location KServe's storage initializer downloads from",
            hint="use s3://BUCKET/PATH, gs://BUCKET/PATH, pvc://CLAIM/PATH or hf://ORG/REPO "
            "(--set deploy.storage_uri=...)",
        )
    if match["scheme"] == "hf" and not match["path"]:
        raise TuneloopError(f"deploy.storage_uri {uri!r} names no repository", hint="use hf://ORG/REPO")
    return uri


def inference_service(ctx: DeployContext, uri: str, command: list[str]) -> dict[str, Any]:
    settings = ctx.settings
    container = {
        "name": PREDICTOR_CONTAINER,
        "image": settings.vllm_image,
        "command": command,
        # A custom predictor's STORAGE_URI is what KServe's storage initializer downloads to /mnt/models.
        "env": [{"name": "STORAGE_URI", "value": uri}, *ENGINE_ENV],
        # Knative routes to the one declared port; "http1" says it speaks HTTP/1.1 (vLLM's uvicorn).
        "ports": [{"name": "http1", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "readinessProbe": http_probe("/health", ENGINE_PORT, period=10, failures=3),
        "resources": gpu_resources(ctx),
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": ctx.model_name,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/part-of": "tuneloop"},
            "annotations": {
                # Knative (serverless) mode: concurrency autoscaling and scale to zero; KServe's default mode
                # (Standard, a plain Deployment + HPA) scales on CPU/memory only.
                "serving.kserve.io/deploymentMode": "Knative",
                "tuneloop.dev/model": ctx.model.reference,
            },
        },
        "spec": {
            "predictor": {
                "minReplicas": settings.min_replicas,
                "maxReplicas": settings.max_replicas,
                "scaleMetric": "concurrency",
                "scaleTarget": settings.max_concurrent_requests,
                "timeout": 600,  # seconds a request may take (long generations)
                **gpu_scheduling(ctx),
                "containers": [container],
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
            }
        },
    }


def llm_inference_service(ctx: DeployContext, uri: str, command: list[str]) -> dict[str, Any]:
    settings = ctx.settings
    scheme = uri.split("://", 1)[0]
    model: dict[str, Any] = {"uri": uri, "name": ctx.model.base_model}
    if scheme in LORA_SCHEMES:
        # The engine's own --lora-modules already load the adapters from /mnt/models (so the controller injects no
        # LoRA flags of its own); declaring them gives the router and scheduler their names.
        model["lora"] = {
            "adapters": [
                {"name": served, "uri": f"{uri}/{ADAPTERS_DIR}/{folder}"}
                for served, folder in ctx.model.adapters.items()
            ],
            "maxRank": ctx.model.lora_rank,
            "maxAdapters": len(ctx.model.adapters),
        }
    main = {
        "name": LLM_CONTAINER,
        "image": settings.vllm_image,
        "command": command,
        "env": ENGINE_ENV,
        "resources": gpu_resources(ctx),
        # The presets ask for a non-root user (llm-d's image has one); vLLM's official image runs as root.
        "securityContext": {"runAsNonRoot": False},
        # The presets probe over HTTPS when the cluster enables LLMInferenceService TLS; this engine speaks HTTP.
        "startupProbe": http_probe("/health", ENGINE_PORT, period=10, failures=180, scheme="HTTP"),
        "livenessProbe": http_probe("/health", ENGINE_PORT, period=15, failures=4, scheme="HTTP"),
        "readinessProbe": http_probe("/health", ENGINE_PORT, period=5, failures=3, scheme="HTTP"),
    }
    spec: dict[str, Any] = {"model": model}
    if settings.min_replicas == settings.max_replicas:
        spec["replicas"] = settings.max_replicas
    else:
        spec["scaling"] = _keda_scaling(ctx)
    spec["router"] = {"route": {}, "gateway": {}}  # a managed HTTPRoute on KServe's default Gateway
    spec["template"] = {**gpu_scheduling(ctx), "containers": [main]}
    return {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceService",
        "metadata": {
            "name": ctx.model_name,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/part-of": "tuneloop"},
            "annotations": {"tuneloop.dev/model": ctx.model.reference},
        },
        "spec": spec,
    }


def _keda_scaling(ctx: DeployContext) -> dict[str, Any]:
    """KEDA scaling on vLLM's requests in flight, deploy.max_concurrent_requests per replica; min_replicas 0 idles
    to zero replicas (KEDA's idleReplicaCount; the scaling floor itself is at least 1)."""
    settings = ctx.settings
    query = f'sum(vllm:num_requests_running{{namespace="{settings.namespace}",model_name="{ctx.model.base_model}"}})'
    keda: dict[str, Any] = {
        "cooldownPeriod": settings.scaledown_window_s,
        "triggers": [
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": settings.prometheus_url,
                    "query": query,
                    "threshold": str(settings.max_concurrent_requests),
                },
            }
        ],
    }
    if settings.min_replicas == 0:
        keda["idleReplicaCount"] = 0
    return {"minReplicas": max(1, settings.min_replicas), "maxReplicas": settings.max_replicas, "keda": keda}


def model_loader(ctx: DeployContext, uri: str) -> dict[str, Any] | None:
    """For pvc:// URIs: the claim and a pod to copy model/ into it. The claim outlives versions (each has its own
    path in it), so it is sized for a few of them; ReadWriteMany lets replicas on several nodes mount it."""
    match = STORAGE_URI_RE.match(uri)
    if match is None or match["scheme"] != "pvc":
        return None
    claim, path = match["location"], (match["path"] or "/").rstrip("/")
    size_gib = max(1, int(ctx.model_bytes * VERSIONS_PER_CLAIM / 2**30) + 1)
    namespace = ctx.settings.namespace
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "tuneloop"}},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{size_gib}Gi"}}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{claim}-loader", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "loader",
                    "image": "busybox:1.37",
                    "command": ["sh", "-c", f"mkdir -p /data{path} && sleep 3600"],
                    "volumeMounts": [{"name": "models", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }
    return {"pvc": pvc, "pod": pod, "claim": claim, "copy_to": f"/data{path}", "pod_name": pod["metadata"]["name"]}


def upload_commands(uri: str, loader: dict[str, Any] | None, namespace: str) -> str:
    scheme = uri.split("://", 1)[0]
    if scheme == "s3":
        return f"aws s3 sync model/ {uri}/"
    if scheme == "gs":
        return f"gcloud storage rsync --recursive model/ {uri}/"
    if scheme == "hf":
        return f"hf upload {uri.removeprefix('hf://')} model/ . --repo-type model"
    assert loader is not None
    pod = loader["pod_name"]
    return (
        f"kubectl -n {namespace} get pvc {loader['claim']} || kubectl apply -f model-claim.yaml   # once\n"
        "kubectl apply -f model-loader.yaml\n"
        f"kubectl -n {namespace} wait --for=condition=Ready pod/{pod} --timeout=5m\n"
        f"kubectl -n {namespace} cp model/. {pod}:{loader['copy_to']}\n"
        f"kubectl -n {namespace} delete pod {pod}"
    )


def write(ctx: DeployContext) -> TargetOutput:
    uri = storage_uri(ctx)
    command = ctx.vllm_command(MODEL_ROOT)
    header = f"# {ctx.name}: {ctx.model.reference} on {ctx.model.base_model}, written by `tuneloop deploy kserve`.\n"
    ctx.write("inferenceservice.yaml", dump(inference_service(ctx, uri, command), header=header))
    ctx.write(
        "llminferenceservice.yaml",
        dump(
            llm_inference_service(ctx, uri, command),
            header=header + "# The alternative to inferenceservice.yaml on KServe with LLMInferenceService (llm-d); "
            "apply one of the two.\n",
        ),
    )
    loader = model_loader(ctx, uri)
    if loader is not None:
        ctx.write(
            "model-claim.yaml",
            dump(
                loader["pvc"],
                header=f"# The claim {uri} lives on, shared by the versions (create it once; it needs a storage\n"
                "# class with ReadWriteMany, e.g. NFS, EFS, Filestore, CephFS, for replicas on several nodes).\n",
            ),
        )
        ctx.write(
            "model-loader.yaml",
            dump(loader["pod"], header=f"# A pod mounting the claim of {uri}, to `kubectl cp` model/ into it.\n"),
        )
    name, namespace = ctx.model_name, ctx.settings.namespace
    registry_name = ctx.model.registry_name or "NAME"
    commands = {
        "upload": upload_commands(uri, loader, namespace),
        "deploy": "kubectl apply -f inferenceservice.yaml    # or llminferenceservice.yaml\n"
        f"kubectl -n {namespace} wait --for=condition=Ready inferenceservice/{name} --timeout=30m",
        "call": f"kubectl -n {namespace} get inferenceservice {name} -o jsonpath='{{.status.url}}'   "
        "# base_url: that URL + /v1",
        "rollback": f"tuneloop deploy kserve {registry_name}@previous -c CONFIG --out DIR --force\n"
        "# upload DIR/model/ as above, then kubectl apply -f DIR/inferenceservice.yaml",
        "scale": f"kubectl -n {namespace} patch inferenceservice {name} --type merge -p "
        f'\'{{"spec": {{"predictor": {{"minReplicas": {ctx.settings.min_replicas}, '
        f'"maxReplicas": {ctx.settings.max_replicas}}}}}}}\'',
    }
    ctx.write(
        "README.md",
        ctx.render(
            "kserve_README.md.j2",
            app=name,
            uri=uri,
            scheme=uri.split("://", 1)[0],
            commands=commands,
            engine_command=command,
            loader=loader,
        ),
    )
    return TargetOutput(engine_commands={"gpu": command}, images={"gpu": ctx.settings.vllm_image}, commands=commands)
