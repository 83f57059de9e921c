"""`tuneloop deploy k8s`: plain Kubernetes manifests as a Kustomize base with a GPU and a CPU overlay.

    base/                       Deployment (engine + tuneloop's gateway), Service, HorizontalPodAutoscaler (CPU),
                                ServiceMonitor (Prometheus Operator), namespace and labels
    overlays/gpu/               vLLM image with the weights baked in, nvidia.com/gpu limits, GPU node selector
    overlays/cpu/               llama-server image with the GGUFs baked in
    components/in-flight-autoscaling/
                                optional: the HPA also scales on the gateway's requests in flight per pod
    prometheus-adapter.yaml     prometheus-adapter rules that publish that metric (tuneloop_requests_in_flight)
    Dockerfile, gateway/        the images (tuneloop.deploy.docker.write_images)

Objects are named after the registry model (not NAME-vN), so applying the folder of a newer version is a rolling
update of the same Deployment behind the same Service; the version is a pod label.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tuneloop.cluster.job import dump_yaml
from tuneloop.deploy import TargetOutput
from tuneloop.deploy.context import ENGINE_PORT, GATEWAY_PORT, DeployContext
from tuneloop.deploy.docker import GATEWAY_CONFIGS, write_images

MODEL_ROOT = "/models"
NEEDS_GGUF = True
ENGINE_CONTAINER = "engine"
GATEWAY_CONTAINER = "gateway"
ENGINE_IMAGE = "tuneloop-engine"  # the base's placeholder image name, replaced by each overlay's `images:`
IN_FLIGHT_METRIC = "tuneloop_requests_in_flight"  # as prometheus-adapter publishes the gateway's gauge
GATEWAY_IN_FLIGHT_SERIES = "tuneloop:num_requests_running"  # the gateway's gauge (serve/gateway/metrics.py)
ENGINE_IN_FLIGHT_SERIES = "vllm:num_requests_running"  # vLLM's, used when there is no gateway
CPU_TARGET_UTILIZATION = 70
# Node labels written by NVIDIA's GPU feature discovery for the short names deploy.gpu also gives Modal/RunPod;
# anything else is taken as the label value itself.
GPU_PRODUCT_LABELS = {
    "T4": "Tesla-T4",
    "L4": "NVIDIA-L4",
    "A10G": "NVIDIA-A10G",
    "L40S": "NVIDIA-L40S",
    "A100": "NVIDIA-A100-SXM4-40GB",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB",
    "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "H100": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def gpu_product(ctx: DeployContext) -> str:
    return GPU_PRODUCT_LABELS.get(ctx.settings.gpu, ctx.settings.gpu)


def gpu_scheduling(ctx: DeployContext) -> dict[str, Any]:
    """Pod spec fields that put a pod on the GPU nodes of deploy.gpu (shared with the kserve target)."""
    return {
        "nodeSelector": {GPU_PRODUCT_LABEL: gpu_product(ctx)},
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }


def gpu_resources(ctx: DeployContext) -> dict[str, Any]:
    count = str(ctx.settings.gpu_count)
    return {
        "requests": {"cpu": "4", "memory": "16Gi", GPU_RESOURCE: count},
        "limits": {"memory": "32Gi", GPU_RESOURCE: count},
    }


def http_probe(path: str, port: int | str, period: int, failures: int, scheme: str | None = None) -> dict[str, Any]:
    """An HTTP probe; `scheme` pins HTTP or HTTPS where the platform would otherwise choose."""
    return {
        "httpGet": {"path": path, "port": port, **({"scheme": scheme} if scheme else {})},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def split_image(reference: str) -> tuple[str, str]:
    """`repo/name:tag` -> (`repo/name`, `tag`) for Kustomize's `images:`."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


def dump(*documents: dict[str, Any], header: str = "") -> str:
    return header + dump_yaml(*documents)


def labels(ctx: DeployContext) -> dict[str, str]:
    return {"app.kubernetes.io/name": ctx.model_name, "app.kubernetes.io/part-of": "tuneloop"}


def deployment(ctx: DeployContext) -> dict[str, Any]:
    """The base Deployment: the engine (image and command set by the overlays) and, with deploy.gateway,
    tuneloop's gateway in front of it in the same pod (it reaches the engine at 127.0.0.1)."""
    engine: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": ENGINE_IMAGE,
        "ports": [{"name": "engine", "containerPort": ENGINE_PORT}],
        # Loading weights takes minutes on a cold node: the startup probe allows 30 minutes before liveness starts.
        "startupProbe": http_probe("/health", ENGINE_PORT, period=10, failures=180),
        "livenessProbe": http_probe("/health", ENGINE_PORT, period=15, failures=4),
    }
    containers = [engine]
    if ctx.settings.gateway:
        containers.append(
            {
                "name": GATEWAY_CONTAINER,
                "image": ctx.image("gateway"),
                "args": ["-c", f"/etc/tuneloop/{GATEWAY_CONFIGS['gpu']}"],
                "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
                "env": [
                    {
                        "name": "TUNELOOP_API_KEYS",
                        "valueFrom": {
                            "secretKeyRef": {"name": ctx.settings.api_key_secret, "key": "TUNELOOP_API_KEYS"}
                        },
                    }
                ],
                "readinessProbe": http_probe("/ready", "http", period=5, failures=3),
                "livenessProbe": http_probe("/health", "http", period=15, failures=4),
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
            }
        )
    else:
        engine["ports"] = [{"name": "http", "containerPort": ENGINE_PORT}]
        engine["readinessProbe"] = http_probe("/health", "http", period=5, failures=3)
    pod_labels = {
        **labels(ctx),
        "app.kubernetes.io/version": f"v{ctx.model.version}" if ctx.model.version else "unregistered",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": ctx.model_name, "annotations": {"tuneloop.dev/model": ctx.model.reference}},
        "spec": {
            "replicas": ctx.settings.replicas,
            "selector": {"matchLabels": labels(ctx)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"containers": containers, "terminationGracePeriodSeconds": 60},
            },
        },
    }


def service(ctx: DeployContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ctx.model_name, "labels": labels(ctx)},
        "spec": {
            "selector": labels(ctx),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def autoscaler(ctx: DeployContext) -> dict[str, Any]:
    # A HorizontalPodAutoscaler cannot go below one replica without the HPAScaleToZero feature gate.
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": ctx.model_name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.model_name},
            "minReplicas": max(1, ctx.settings.min_replicas),
            "maxReplicas": ctx.settings.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": CPU_TARGET_UTILIZATION},
                    },
                }
            ],
        },
    }


def service_monitor(ctx: DeployContext) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": ctx.model_name, "labels": labels(ctx)},
        "spec": {
            "selector": {"matchLabels": labels(ctx)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def in_flight_patch(ctx: DeployContext) -> list[dict[str, Any]]:
    """JSON patch adding the per-pod in-flight target (deploy.max_concurrent_requests) to the HPA."""
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": IN_FLIGHT_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(ctx.settings.max_concurrent_requests)},
        },
    }
    return [{"op": "add", "path": "/spec/metrics/-", "value": metric}]


def prometheus_adapter_values(ctx: DeployContext) -> dict[str, Any]:
    """Helm values for prometheus-community/prometheus-adapter publishing the in-flight gauge per pod."""
    series = GATEWAY_IN_FLIGHT_SERIES if ctx.settings.gateway else ENGINE_IN_FLIGHT_SERIES
    address = urlsplit(ctx.settings.prometheus_url)
    return {
        # The chart takes the URL without its port, and the port apart.
        "prometheus": {"url": f"{address.scheme}://{address.hostname}", "port": address.port or 9090},
        "rules": {
            "default": False,
            "custom": [
                {
                    "seriesQuery": f'{{__name__="{series}",namespace!="",pod!=""}}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                    "name": {"matches": f"^{series}$", "as": IN_FLIGHT_METRIC},
                    "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
                }
            ],
        },
    }


def overlay(ctx: DeployContext, device: str, image: str, command: list[str]) -> dict[str, str]:
    """The overlay's files: kustomization.yaml and the strategic-merge patch of the Deployment."""
    containers: list[dict[str, Any]] = [{"name": ENGINE_CONTAINER, "command": command}]
    spec: dict[str, Any] = {"containers": containers}
    if device == "gpu":
        containers[0]["resources"] = gpu_resources(ctx)
        # vLLM's workers share tensors through /dev/shm, which a container gets 64 MiB of by default.
        containers[0]["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
        spec["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
        spec.update(gpu_scheduling(ctx))
    else:
        containers[0]["resources"] = {"requests": {"cpu": "4", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    if ctx.settings.gateway:
        containers.append({"name": GATEWAY_CONTAINER, "args": ["-c", f"/etc/tuneloop/{GATEWAY_CONFIGS[device]}"]})
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": ctx.model_name},
        "spec": {"template": {"spec": spec}},
    }
    new_name, new_tag = split_image(image)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        "patches": [{"path": "engine.yaml"}],
        "images": [{"name": ENGINE_IMAGE, "newName": new_name, "newTag": new_tag}],
        "labels": [{"pairs": {"tuneloop.dev/device": device}, "includeSelectors": False}],
    }
    header = f"# {ctx.model_name} on {device.upper()}s: the engine's image and its command line (`tuneloop serve`'s).\n"
    return {"kustomization.yaml": dump(kustomization, header=header), "engine.yaml": dump(patch)}


def write(ctx: DeployContext) -> TargetOutput:
    build = write_images(ctx, engine_url=f"http://127.0.0.1:{ENGINE_PORT}/v1")
    engine_commands = {"gpu": ctx.vllm_command(MODEL_ROOT), "cpu": ctx.llamacpp_command(MODEL_ROOT)}
    header = f"# {ctx.name}: {ctx.model.reference} on {ctx.model.base_model}, written by `tuneloop deploy k8s`.\n"

    ctx.write("base/deployment.yaml", dump(deployment(ctx), header=header))
    ctx.write("base/service.yaml", dump(service(ctx), header=header))
    ctx.write("base/hpa.yaml", dump(autoscaler(ctx), header=header))
    ctx.write(
        "base/servicemonitor.yaml",
        dump(service_monitor(ctx), header=header + "# Needs the Prometheus Operator's CRDs (kube-prometheus-stack).\n"),
    )
    base = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": ctx.settings.namespace,
        "resources": ["deployment.yaml", "service.yaml", "hpa.yaml", "servicemonitor.yaml"],
    }
    ctx.write("base/kustomization.yaml", dump(base, header=header))
    for device, role in (("gpu", "gpu"), ("cpu", "cpu")):
        for name, text in overlay(ctx, device, build.images[role], engine_commands[device]).items():
            ctx.write(f"overlays/{device}/{name}", text)
    component = {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "patches": [
            {
                "path": "hpa-in-flight.yaml",
                "target": {"group": "autoscaling", "version": "v2", "kind": "HorizontalPodAutoscaler"},
            }
        ],
    }
    ctx.write(
        "components/in-flight-autoscaling/kustomization.yaml",
        dump(
            component,
            header="# Scale on requests in flight per pod too: add `components: [../../components/in-flight-"
            "autoscaling]`\n# to an overlay once prometheus-adapter publishes the metric (prometheus-adapter.yaml).\n",
        ),
    )
    ctx.write(
        "components/in-flight-autoscaling/hpa-in-flight.yaml",
        dump_yaml(in_flight_patch(ctx)),
    )
    ctx.write(
        "prometheus-adapter.yaml",
        dump(
            prometheus_adapter_values(ctx),
            header=f"# helm install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring -f "
            f"prometheus-adapter.yaml\n# publishes {IN_FLIGHT_METRIC} per pod in the custom metrics API.\n",
        ),
    )

    namespace = ctx.settings.namespace
    name = ctx.model_name
    registry_name = ctx.model.registry_name or "NAME"
    commands = {
        "build": build.build,
        "push": build.push,
        "deploy": f"kubectl create namespace {namespace} --dry-run=client -o yaml | kubectl apply -f -\n"
        f"kubectl -n {namespace} create secret generic {ctx.settings.api_key_secret} "
        "--from-literal=TUNELOOP_API_KEYS=change-me\n"
        "kubectl apply -k overlays/gpu    # or overlays/cpu: llama.cpp on CPUs\n"
        f"kubectl -n {namespace} rollout status deployment/{name} --timeout=30m",
        "call": f"kubectl -n {namespace} port-forward service/{name} 8080:80   # then base_url http://127.0.0.1:8080/v1",
        "rollback": f"kubectl -n {namespace} rollout undo deployment/{name}\n"
        f"# or: tuneloop deploy k8s {registry_name}@previous -c CONFIG --out DIR --force, build, push, "
        "kubectl apply -k DIR/overlays/gpu",
        "scale": f"kubectl -n {namespace} patch hpa {name} -p "
        f'\'{{"spec": {{"minReplicas": {max(1, ctx.settings.min_replicas)}, '
        f'"maxReplicas": {ctx.settings.max_replicas}}}}}\'',
    }
    ctx.write(
        "README.md",
        ctx.render(
            "k8s_README.md.j2",
            app=name,
            images=build.images,
            commands=commands,
            engine_commands=engine_commands,
            gpu_product=gpu_product(ctx),
            in_flight_metric=IN_FLIGHT_METRIC,
            cpu_target=CPU_TARGET_UTILIZATION,
        ),
    )
    return TargetOutput(engine_commands=engine_commands, images=build.images, commands=commands)
