"""`build_app(args)`: the serve config's import_path (`serve_app.app:build_app`).

Serve validates `args` into a MinerConfig (the parameter's annotation) before calling
this; here we also check what needs the filesystem (the wallet's hotkey, snapshot
files), so a bad deployment fails at `serve run` rather than in a replica. Serve then
retries the build without end, so `check_config_file` runs the same checks on a serve config
file without Serve: `torchrank-miner config check`, and `make run` before it starts
`serve run` (serve_app/rayenv.py). Heavy libraries (torch, sentence-transformers,
diffusers) load only inside the workload replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from pydantic import ValidationError
from ray.serve import Application

from serve_app.chain.metagraph import SnapshotSource
from serve_app.config import CANDIDATE_SUFFIX, MinerConfig, SnapshotMetagraph
from serve_app.observability.info import BuildInfo
from serve_app.observability.logs import REPLICA_LOGS
from serve_app.ops.autoscaling import serve_autoscaling_config
from serve_app.router.deployment import Router
from serve_app.workloads.agents import Agents
from serve_app.workloads.diffusion import Diffusion
from serve_app.workloads.embeddings import Embeddings


def with_absolute_paths(cfg: MinerConfig, base: Union[str, Path, None] = None) -> MinerConfig:
    """Snapshot and ledger paths resolved against `base`: by default the directory `serve run` started in."""
    subnets = []
    for subnet in cfg.subnets:
        if isinstance(subnet.metagraph, SnapshotMetagraph):
            path = str((Path(base or ".") / Path(subnet.metagraph.path).expanduser()).resolve())
            subnet = subnet.model_copy(update={"metagraph": subnet.metagraph.model_copy(update={"path": path})})
        subnets.append(subnet)
    ledger = cfg.ledger.model_copy(update={"path": str((Path(base or ".") / Path(cfg.ledger.path).expanduser()).resolve())})
    return cfg.model_copy(update={"subnets": tuple(subnets), "ledger": ledger})


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


def with_placement(deployment, wl, name: str, cfg: MinerConfig, deployment_name: str | None = None):
    """A workload deployment with its config's placement, sizing and load bounds."""
    where = wl.placement
    sizing = ({"autoscaling_config": serve_autoscaling_config(where.autoscaling, cfg.latency_slo_s(name), wl.batch_items)}
              if where.autoscaling else {"num_replicas": where.num_replicas})
    return deployment.options(
        **sizing,
        name=deployment_name or deployment.name,
        ray_actor_options={"num_cpus": where.num_cpus, "num_gpus": where.num_gpus,
                           "resources": {} if where.preemption_safe else on_demand_only(cfg)},
        max_ongoing_requests=wl.load.max_ongoing_requests,
        max_queued_requests=wl.load.max_queued_requests,
        max_surge_percent=where.max_surge_percent,
        logging_config=REPLICA_LOGS,
    )


def build_app(args: MinerConfig) -> Application:
    cfg = with_absolute_paths(MinerConfig.model_validate(args))
    check_startable(cfg)
    workloads, candidates = {}, {}

    def bind(name: str, deployment, *extra):
        wl = getattr(cfg.workloads, name)
        if wl is None:
            return
        workloads[name] = with_placement(deployment, wl, name, cfg).bind(wl, *extra)
        if wl.canary is not None:  # its own deployment, placement and replicas, beside the stable one
            candidate = wl.candidate()
            candidates[name] = with_placement(deployment, candidate, name, cfg,
                                              deployment.name + CANDIDATE_SUFFIX).bind(candidate, *extra,
                                                                                       role="candidate")

    bind("embeddings", Embeddings)
    bind("diffusion", Diffusion)
    # The retrieve tool calls the (stable) embeddings deployment directly, beside the router's calls.
    bind("agents", Agents, workloads.get("embeddings"))
    return Router.options(
        num_replicas=cfg.router.num_replicas,
        ray_actor_options={"num_cpus": cfg.router.num_cpus, "resources": on_demand_only(cfg)},
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        logging_config=REPLICA_LOGS,
    ).bind(cfg, workloads, BuildInfo(), candidates)


class ConfigError(ValueError):
    """A serve config that cannot start the miner: one line per real problem, each a field
    path and its message (`subnets[0].auth.require_reciever: Extra inputs are not permitted`)."""

    def __init__(self, source: Union[str, Path], problems: list[str], unreadable: bool = False):
        self.source, self.problems, self.unreadable = str(source), problems, unreadable
        super().__init__("; ".join(f"{self.source}: {p}" for p in problems))

    def lines(self) -> list[str]:
        return [f"{self.source}: {problem}" for problem in self.problems]


def field_path(loc: tuple, data: object = None) -> str:
    """pydantic's loc as the config's field path: ('subnets', 0, 'auth') -> subnets[0].auth.

    Given the validated input, a step that is no key of it (a tagged union's tag, as in
    subnets.0.metagraph.snapshot.path) is left out, unless it is the last (a missing field)."""
    out, node = "", data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, (list, tuple)) and -len(node) <= part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and i < len(loc) - 1:
            continue
        node = node.get(part) if isinstance(node, dict) else None
        out += f".{part}" if out else str(part)
    return out


def validation_problems(exc: ValidationError, data: object = None) -> list[str]:
    """One line per real problem of a pydantic ValidationError of `data`.

    pydantic's "Value error, " prefix on our validators' messages is dropped."""
    problems = []
    for err in exc.errors():
        kind, msg, value = err["type"], err["msg"], err.get("input")
        if kind == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif (kind not in ("extra_forbidden", "missing", "assertion_error")
              and isinstance(value, (str, int, float)) and len(repr(value)) <= 60):
            msg += f" (got {value!r})"
        path = field_path(err["loc"], data)
        problems.append(f"{path}: {msg}" if path else msg)
    return problems


def miner_apps(source: Union[str, Path]) -> list[dict]:
    """The miner's applications (import_path serve_app.app:build_app) of a serve config file,
    perhaps none; ConfigError, one line, when it cannot be read or is not YAML."""
    import yaml

    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read it: {exc.strerror or exc}"], unreadable=True) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, [f"not valid YAML{where}: {problem}"]) from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list):
        return []
    return [a for a in apps if isinstance(a, dict) and a.get("import_path") == "serve_app.app:build_app"]


def serve_config_apps(source: Union[str, Path]) -> list[dict]:
    """miner_apps, and a ConfigError when there is none."""
    apps = miner_apps(source)
    if not apps:
        raise ConfigError(source, ["no application with import_path serve_app.app:build_app"])
    return apps


def load_config(source: Union[str, Path, dict], app_name: str | None = None) -> MinerConfig:
    """A MinerConfig from a serve config file (its application's `args`) or a dict of args.

    pydantic's ValidationError for bad args; ConfigError for a file that cannot be read or holds
    no miner application."""
    if isinstance(source, dict):
        return MinerConfig.model_validate(source)
    apps = serve_config_apps(source)
    if app_name is not None:
        apps = [a for a in apps if a.get("name") == app_name]
        if not apps:
            raise ConfigError(source, [f"no application named {app_name!r} with import_path serve_app.app:build_app"])
    return MinerConfig.model_validate(apps[0].get("args") or {})


def check_config_file(source: Union[str, Path], base: Union[str, Path, None] = None,
                      startable: bool = True) -> list[MinerConfig]:
    """What `build_app` checks, for every miner application in a serve config file, without
    Serve: the args' schema and, if `startable`, the wallet's hotkey and the snapshot files
    (relative paths against `base`, by default the current directory, as `serve run` from here
    sees them).

    `torchrank-miner config check` and `make run` (serve_app.rayenv, before `serve run`) use it.
    ConfigError with every real problem, one line each; apps named when the file has several."""
    apps = serve_config_apps(source)
    configs, problems = [], []
    for app in apps:
        where = f"applications[{app.get('name')}]." if len(apps) > 1 else ""
        args = app.get("args") or {}
        try:
            cfg = MinerConfig.model_validate(args)
            if startable:
                cfg = with_absolute_paths(cfg, base)
                check_startable(cfg)
        except ValidationError as exc:
            problems += [f"{where}{p}" for p in validation_problems(exc, args)]
        except ValueError as exc:
            problems.append(f"{where}{exc}")
        else:
            configs.append(cfg)
    if problems:
        raise ConfigError(source, problems)
    return configs
