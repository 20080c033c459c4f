"""`build_app(args)`: the serve config's import_path (`serve_app.app:build_app`).

Serve validates `args` into a MinerConfig (the parameter's annotation) before calling
this; here we also check what needs the filesystem (the wallet's hotkey, snapshot
files), so a bad deployment fails at `serve run` rather than in a replica. Heavy
libraries (torch, sentence-transformers, diffusers) load only inside the workload replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ray.serve import Application

from serve_app.chain.metagraph import SnapshotSource
from serve_app.config import MinerConfig, SnapshotMetagraph
from serve_app.observability.info import BuildInfo
from serve_app.observability.logs import JSON_LOGS, WORKLOAD_LOGS
from serve_app.ops.autoscaling import serve_autoscaling_config
from serve_app.router.deployment import Router
from serve_app.workloads.agents import Agents
from serve_app.workloads.diffusion import Diffusion
from serve_app.workloads.embeddings import Embeddings


def with_absolute_paths(cfg: MinerConfig) -> MinerConfig:
    """Snapshot paths resolved against the directory `serve run` started in."""
    subnets = []
    for subnet in cfg.subnets:
        if isinstance(subnet.metagraph, SnapshotMetagraph):
            path = str(Path(subnet.metagraph.path).expanduser().resolve())
            subnet = subnet.model_copy(update={"metagraph": subnet.metagraph.model_copy(update={"path": path})})
        subnets.append(subnet)
    return cfg.model_copy(update={"subnets": tuple(subnets)})


def check_startable(cfg: MinerConfig) -> None:
    cfg.wallet.hotkey_ss58()
    for subnet in cfg.subnets:
        if isinstance(subnet.metagraph, SnapshotMetagraph):
            try:
                SnapshotSource(subnet.metagraph, subnet.netuid).load()
            except Exception as exc:
                raise ValueError(f"subnets[netuid={subnet.netuid}].metagraph.path: {exc}") from None


def on_demand_only(cfg: MinerConfig) -> dict:
    """Ray resources that keep a replica off spot nodes: a sliver of what only on-demand nodes have."""
    name = cfg.cluster.on_demand_resource
    return {name: 0.001} if name else {}


def placed(deployment, wl, name: str, cfg: MinerConfig):
    """A workload deployment with its config's placement, sizing and load bounds."""
    sizing = ({"autoscaling_config": serve_autoscaling_config(wl.autoscaling, cfg.latency_slo_s(name), wl.batch_items)}
              if wl.autoscaling else {"num_replicas": wl.num_replicas})
    return deployment.options(
        **sizing,
        ray_actor_options={"num_cpus": wl.num_cpus, "num_gpus": wl.num_gpus,
                           "resources": {} if wl.preemption_safe else on_demand_only(cfg)},
        max_ongoing_requests=wl.max_ongoing_requests,
        max_queued_requests=wl.max_queued_requests,
        logging_config=WORKLOAD_LOGS,
    )


def build_app(args: MinerConfig) -> Application:
    cfg = with_absolute_paths(MinerConfig.model_validate(args))
    check_startable(cfg)
    workloads = {}
    for name, deployment in (("embeddings", Embeddings), ("diffusion", Diffusion)):
        wl = getattr(cfg.workloads, name)
        if wl is not None:
            workloads[name] = placed(deployment, wl, name, cfg).bind(wl)
    agents = cfg.workloads.agents
    if agents is not None:
        # The retrieve tool calls the embeddings deployment directly, beside the router's calls.
        workloads["agents"] = placed(Agents, agents, "agents", cfg).bind(agents, workloads.get("embeddings"))
    return Router.options(
        num_replicas=cfg.router.num_replicas,
        ray_actor_options={"num_cpus": cfg.router.num_cpus, "resources": on_demand_only(cfg)},
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        logging_config=JSON_LOGS,
    ).bind(cfg, workloads, BuildInfo())


def load_config(source: Union[str, Path, dict], app_name: str | None = None) -> MinerConfig:
    """A MinerConfig from a serve config file (its application's `args`) or a dict of args."""
    if isinstance(source, dict):
        return MinerConfig.model_validate(source)
    import yaml

    doc = yaml.safe_load(Path(source).read_text())
    apps = [a for a in doc.get("applications", []) if a.get("import_path") == "serve_app.app:build_app"]
    if app_name is not None:
        apps = [a for a in apps if a.get("name") == app_name]
    if not apps:
        raise ValueError(f"{source}: no application with import_path serve_app.app:build_app")
    return MinerConfig.model_validate(apps[0].get("args") or {})
