"""The miner's configuration: one pydantic tree, passed as `args:` in a serve config.

`build_app(args: MinerConfig)` makes Ray Serve validate the tree before any replica
starts, so a wrong field fails `serve run` with a message naming it. This module
imports nothing heavy: the builder must import in milliseconds.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.protocols.registry import PROTOCOLS

# Serve's port when a serve config's http_options gives none: an endpoint's default port.
DEFAULT_HTTP_PORT = 8000
CANDIDATE_SUFFIX = "Candidate"  # a canary's deployment: the workload's deployment name + this
DEV_URI = re.compile(r"^//[A-Za-z0-9]+$")
# ss58 addresses of the Substrate dev keys (Keypair.create_from_uri; tests/unit/test_config.py checks them against
# the SDK), hard-coded so this module imports nothing heavy. Anyone can sign as them.
DEV_HOTKEYS = {
    "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY": "//Alice",
    "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty": "//Bob",
    "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y": "//Charlie",
    "5DAAnrj7VHTznn2AWBemMuyBwZWs6FNFjdyVXUeYum3PTXFy": "//Dave",
    "5HGjWAeFDfFCWPsjFQdVV2Msvz2XtMktvgocEZcCj68kUMaw": "//Eve",
    "5CiPPseXPECbkjWCa6MnjNokrgYjMqmKndv2rSnekmSK2DjL": "//Ferdie",
}


def not_above(model, low: str, high: str):
    """`model` if its field `low` is at most its field `high` (a validator's check), else ValueError."""
    if getattr(model, low) > getattr(model, high):
        raise ValueError(f"{low} ({getattr(model, low)}) exceeds {high} ({getattr(model, high)})")
    return model


def over(default: BaseModel, given: dict, whole: bool = False) -> dict:
    """The fields of `default` with those `given` in their place; a section (a model) given as a
    dict is merged the same way, one level down. A dict-valued field (presets) is replaced whole.
    Only the fields where `default` differs from its class's own defaults are filled (`whole`:
    all of them), so that a section left out is filled by its own validator, one level down."""
    out = {name: getattr(default, name) for name, field in type(default).model_fields.items()
           if whole or getattr(default, name) != field.get_default(call_default_factory=True)}
    for key, value in given.items():
        current = out.get(key)
        out[key] = over(current, value, whole=True) if isinstance(current, BaseModel) and isinstance(value, dict) \
            else value
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data):
        """Old names first (as the user wrote them), then a section given in part keeps the rest
        of its field's default, not its class's: with embeddings' `load: {max_ongoing_requests:
        256}` the admission caps stay embeddings' own."""
        if not isinstance(data, dict):
            return data
        out = cls._read_legacy_names(dict(data))
        for name, field in cls.model_fields.items():
            if isinstance(field.default, BaseModel) and isinstance(out.get(name), dict):
                out[name] = over(field.default, out[name])
        return out

    @classmethod
    def _read_legacy_names(cls, data: dict) -> dict:
        return data  # no old names (Workload has some)


class WalletConfig(Strict):
    """The miner's hotkey: a wallet on disk, or a Substrate dev URI for local use.

    Only the hotkey's public address is read; no secret is loaded to serve requests.
    """

    name: Optional[str] = None
    hotkey: str = "default"
    path: str = "~/.bittensor/wallets"
    uri: Optional[str] = Field(
        default=None, description="A well-known dev key such as //Bob; only with a snapshot metagraph."
    )

    @model_validator(mode="after")
    def _one_identity(self) -> "WalletConfig":
        if (self.name is None) == (self.uri is None):
            raise ValueError("set exactly one of wallet.name (a wallet on disk) or wallet.uri (a //Dev key)")
        if self.uri is not None and not DEV_URI.match(self.uri):
            # Anything else (a mnemonic, a seed) would be a secret in a config file.
            raise ValueError("wallet.uri accepts only well-known dev keys like //Bob; use wallet.name for real keys")
        return self

    @property
    def is_dev_key(self) -> bool:
        return self.uri is not None

    def hotkey_ss58(self) -> str:
        """The miner hotkey's ss58 address (raises ValueError with a clear message)."""
        from bittensor.sp_core import Keypair

        if self.uri is not None:
            return Keypair.create_from_uri(self.uri).ss58_address
        import bittensor

        wallet = bittensor.Wallet(name=self.name, hotkey=self.hotkey, path=str(Path(self.path).expanduser()))
        try:
            return wallet.hotkeypub.ss58_address
        except Exception as exc:  # the SDK raises several kinds for a missing/corrupt file
            raise ValueError(
                f"cannot read the public hotkey of wallet {self.name!r}/{self.hotkey!r} under {self.path}: {exc}"
            ) from None


class MetagraphRefresh(Strict):
    """What both metagraph sources share: how long the last good read may still authorise callers."""

    max_age_s: float = Field(
        default=1800.0, gt=0,
        description="While the source fails, the last good view authorises callers this long after it was read; "
                    "after it only allow_hotkeys are admitted (503 for the rest), so a deregistered validator "
                    "does not keep access through an outage. Above refresh_s.")

    @model_validator(mode="after")
    def _max_age_above_refresh(self):
        if self.max_age_s <= self.refresh_s:
            raise ValueError(f"max_age_s ({self.max_age_s:g}) must be above refresh_s ({self.refresh_s:g}): "
                             f"every view would expire before the next read")
        return self


class SnapshotMetagraph(MetagraphRefresh):
    """A metagraph JSON file (see deployments/local-metagraph.json); re-read when it changes."""

    source: Literal["snapshot"] = "snapshot"
    path: str
    refresh_s: float = Field(default=5.0, gt=0)


class ChainMetagraph(MetagraphRefresh):
    """The live chain through the bittensor SDK, refreshed in the background."""

    source: Literal["chain"] = "chain"
    network: str = Field(default="finney", description="finney, test, local, or a ws(s):// endpoint")
    refresh_s: float = Field(default=120.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)


MetagraphSource = Annotated[Union[SnapshotMetagraph, ChainMetagraph], Field(discriminator="source")]


class AuthPolicy(Strict):
    """How the subnet's validators sign (btauth/1 or Epistula v2) and who may use its routes."""

    scheme: Literal["btauth", "epistula"] = Field(
        default="btauth", description="btauth: bittensor's btauth/1 headers (X-Bittensor-*); epistula: Epistula v2 "
                                      "(Epistula-* headers), which signs the body but not the method or path.")
    max_age_s: float = Field(default=10.0, gt=0, le=3600,
                             description="A signature older than this is stale (Epistula implementations use 8).")
    allowed_skew_s: float = Field(default=2.0, ge=0, le=600, description="How far ahead a sender's clock may be.")
    require_receiver: bool = Field(
        default=True, description="Refuse requests not bound to our hotkey (they could be replayed from another miner)."
    )
    require_validator_permit: bool = True
    min_stake: float = Field(default=0.0, ge=0, description="In the subnet's stake units (the neuron's total_stake).")
    allow_hotkeys: tuple[str, ...] = Field(
        default=(), description="Admitted after authentication whatever their registration, permit or stake."
    )
    deny_hotkeys: tuple[str, ...] = Field(default=(), description="Always refused.")

    @model_validator(mode="after")
    def _lists_disjoint(self) -> "AuthPolicy":
        both = set(self.allow_hotkeys) & set(self.deny_hotkeys)
        if both:
            raise ValueError(f"hotkeys both allowed and denied: {sorted(both)}")
        return self


class RouteConfig(Strict):
    path: str = Field(pattern=r"^/[A-Za-z0-9_\-./]*$")
    protocol: Literal[tuple(PROTOCOLS)]  # serve_app/protocols/registry.py


class SLOConfig(Strict):
    """A subnet's service-level objectives, exported as metrics so one set of Prometheus
    rules (monitoring/rules) computes every subnet's error budget and burn rates."""

    latency_s: float = Field(default=1.0, gt=0, le=60, description="An admitted request answered slower than this misses the latency SLO.")
    latency_objective: float = Field(default=0.95, gt=0, lt=1, description="Share of admitted requests that must be faster than latency_s.")
    availability_objective: float = Field(default=0.995, gt=0, lt=1, description="Share of admitted requests that must not fail on the miner's side (5xx).")


class BreakerConfig(Strict):
    """A circuit breaker per (subnet, workload) in each router replica (serve_app/ops/breaker.py)."""

    consecutive_failures: int = Field(default=5, ge=1, description="Open after this many failed calls in a row.")
    failure_rate: float = Field(default=0.5, gt=0, le=1, description="...or when more than this share of calls failed in window_s")
    min_calls: int = Field(default=20, ge=1, description="...with at least this many calls in the window.")
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=5.0, gt=0, description="Fail fast this long, then let probes through.")
    half_open_probes: int = Field(default=1, ge=1)


class RateLimitConfig(Strict):
    """Per-hotkey token buckets; a validator's rate follows its share of the subnet's validator stake."""

    enabled: bool = True
    total_rps: float = Field(default=1000.0, gt=0, description="Requests/s shared by all validators in proportion to stake.")
    floor_rps: float = Field(default=2.0, ge=0, description="The least any admitted hotkey gets, whatever its stake.")
    burst_s: float = Field(default=2.0, gt=0, description="A bucket holds this many seconds of its rate (at least 1 request).")
    overrides: dict[str, float] = Field(
        default_factory=dict, description="hotkey -> requests/s, replacing the stake rule (allow-listed hotkeys are unlimited unless here).")


class WatchdogConfig(Strict):
    """When is a subnet degraded? Checked every few seconds by each router replica."""

    window_s: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=20, ge=1, description="Latency and error checks need this many requests in the window.")
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_metagraph_age_s: float = Field(
        default=1200.0, gt=0, description="Older than this: degraded, and /ready answers 503.")


class SubnetDiffusion(Strict):
    """Which of the diffusion workload's presets this subnet's validators get, and how far a
    request may raise its steps and size: pixel-steps are what an image costs."""

    default_preset: Optional[str] = Field(default=None, description="For requests naming none; default: the workload's.")
    allowed_presets: tuple[str, ...] = Field(default=(), description="Presets a request may name; empty: all of them.")
    max_steps: Optional[int] = Field(default=None, ge=1, description="Steps a request may ask for (422 above); "
                                                                     "default: the workload's max_steps.")
    max_side: Optional[int] = Field(default=None, ge=8, multiple_of=8,
                                    description="Width and height a request may ask for (422 above); "
                                                "default: the workload's max_side.")


class EndpointConfig(Strict):
    """The public endpoint validators reach this miner at, as the chain's axon publishes it
    (`torchrank-miner publish`); behind NAT or a load balancer it differs from http_options."""

    ip: str = Field(description="Public IPv4 or IPv6 address.")
    port: Optional[int] = Field(default=None, ge=1, le=65535, description="Default: the serve config's http_options.port.")

    @field_validator("ip")
    @classmethod
    def _routable(cls, ip: str) -> str:
        import ipaddress

        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"{ip!r} is not an IPv4 or IPv6 address") from None
        if address.is_unspecified or address.is_multicast:
            raise ValueError(f"{ip} cannot be reached by a validator: give the miner's public address")
        return str(address)


class RewardConfig(Strict):
    """What one task of this subnet earns (serve_app/economics/money.py)."""

    source: Literal["fixed", "chain"] = Field(
        default="fixed", description="fixed: per_task_tao for each accepted task; chain: the miner's own emission on "
                                     "the subnet (its metagraph's emission at the subnet price), whatever the tasks.")
    per_task_tao: float = Field(default=0.0, ge=0, description="TAO an accepted task earns (source fixed).")


class SubnetConfig(Strict):
    netuid: int = Field(ge=0, le=65535)
    prefix: str = Field(
        default="",
        pattern=r"^(/[A-Za-z0-9_\-]+)*$",
        description="Path prefix of this subnet's routes; one subnet may use '' (the default).",
    )
    metagraph: MetagraphSource
    endpoint: Optional[EndpointConfig] = Field(
        default=None, description="Where validators reach this miner: compared with the chain's axon (metrics, "
                                  "alerts) and published by `torchrank-miner publish`.")
    auth: AuthPolicy = AuthPolicy()
    routes: tuple[RouteConfig, ...] = (RouteConfig(path="/v1/embeddings", protocol="openai-embeddings"),)
    timeout_s: float = Field(default=12.0, gt=0, description="Deadline for a request when the validator sends none.")
    max_timeout_s: float = Field(default=120.0, gt=0, description="The most a validator's X-Bittensor-Timeout may ask for.")
    slo: SLOConfig = SLOConfig()
    breaker: BreakerConfig = BreakerConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    allow_degraded: bool = Field(
        default=False, description="Under sustained overload, may this subnet's work use the workload's cheaper preset?")
    diffusion: SubnetDiffusion = SubnetDiffusion()
    reward: RewardConfig = RewardConfig()

    @field_validator("routes")
    @classmethod
    def _unique_paths(cls, routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        paths = [r.path for r in routes]
        if len(set(paths)) != len(paths):
            raise ValueError(f"duplicate route paths: {paths}")
        if not routes:
            raise ValueError("a subnet needs at least one route")
        return routes

    @model_validator(mode="after")
    def _no_dev_keys_on_a_live_chain(self) -> "SubnetConfig":
        # The allow-list skips every metagraph check, and anyone can sign as a dev key.
        dev = [f"{DEV_HOTKEYS[h]} ({h})" for h in self.auth.allow_hotkeys if h in DEV_HOTKEYS]
        if dev and self.metagraph.source != "snapshot":
            raise ValueError(f"subnet {self.netuid}: auth.allow_hotkeys holds the public dev key {', '.join(dev)}, "
                             f"which anyone can sign as; it is refused with a live chain metagraph (allow it only "
                             f"with a snapshot metagraph for local use)")
        return self

    @model_validator(mode="after")
    def _unready_before_unauthorised(self) -> "SubnetConfig":
        # Otherwise /ready would report ready while every validator gets 503 for the old metagraph.
        if self.watchdog.max_metagraph_age_s > self.metagraph.max_age_s:
            raise ValueError(f"subnet {self.netuid}: watchdog.max_metagraph_age_s "
                             f"({self.watchdog.max_metagraph_age_s:g}) is above metagraph.max_age_s "
                             f"({self.metagraph.max_age_s:g}): /ready must fail no later than the metagraph "
                             f"stops authorising")
        return self


class AdmissionConfig(Strict):
    """Admission to a workload by deadline and stake, per router replica (serve_app/ops/admission.py).

    A request is refused only when the work ahead of it (in stake order), over the
    workload's measured drain rate, would not let it finish inside its deadline. The
    counts below are safety caps for memory, not the working limit."""

    in_flight_items: Optional[float] = Field(
        default=None, gt=0,
        description="Work sent ahead to the workload per replica, in its items (texts, images at the default preset, "
                    "sessions): enough to keep its next pass full; the rest waits at the router in stake order. "
                    "Default: two full batches (agents: the sessions a replica runs at once).")
    deadline_share: float = Field(
        default=0.8, gt=0, le=1,
        description="Admit when the estimated finish lies within this share of the time left before the deadline: "
                    "the estimate is noisy, and an answer after the deadline is wasted work.")
    max_wait_s: Optional[float] = Field(
        default=None, gt=0, description="Also refuse when the estimated wait for a slot exceeds this; default: only "
                                        "the deadline decides.")
    max_in_flight: int = Field(default=256, ge=1, description="Safety cap: requests at the workload at once, per router "
                                                               "replica (autoscaled: at min_replicas, growing with them).")
    max_queued: int = Field(default=512, ge=0, description="Safety cap: requests waiting at the router; when full, the "
                                                           "lowest stake is shed. It bounds the connections a router "
                                                           "holds under sustained overload (benchmarks/README.md).")


class EmbeddingsDegradation(Strict):
    """A cheaper preset for subnets that allow it (`allow_degraded`), on under sustained overload."""

    max_seq_length: int = Field(default=128, ge=8, description="Texts are cut to this many tokens while degraded.")
    busy_fraction: float = Field(default=0.85, gt=0, le=1, description="Overloaded: the model busy this share of the time...")
    waited_items: int = Field(default=8, ge=1, description="...and at least this many texts a second arriving to a busy model...")
    on_after_s: float = Field(default=5.0, ge=0, description="...for this long switches the preset on.")
    off_after_s: float = Field(default=15.0, ge=0, description="Not overloaded for this long switches it off.")


class ReplicaAutoscaling(Strict):
    """Serve autoscales the workload's replicas with serve_app/ops/autoscaling.py's policy:
    up on p95 latency or waiting work, down one at a time after a quiet period."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: Optional[int] = Field(default=None, ge=1, description="Replicas at start; default: min_replicas.")
    latency_slo_s: Optional[float] = Field(
        default=None, gt=0, description="Default: the strictest latency SLO of the subnets this workload serves.")
    target_queued: Optional[int] = Field(
        default=None, ge=1, description="Items (texts, images, sessions) waiting per replica; default: one full batch.")
    up_at: float = Field(default=0.8, gt=0, le=2, description="Scale up when p95 passes this share of the SLO: "
                                                              "the replica's p95 misses the router and network time.")
    down_at: float = Field(default=0.5, gt=0, lt=1, description="Quiet: both signals under this share of their thresholds.")
    quiet_period_s: float = Field(default=30.0, ge=0, description="Quiet this long before each step down.")
    max_step_up: float = Field(default=2.0, ge=1, description="At most this many times the replicas per step up.")

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicaAutoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) is outside min_replicas..max_replicas")
        return self


class Placement(Strict):
    """Where a workload's replicas run and how many there are."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count; leave it at 1 with autoscaling.")
    autoscaling: Optional[ReplicaAutoscaling] = None
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0, description="A fraction packs replicas onto one GPU (logical only: "
                                                           "see gpu_memory_fraction).")
    gpu_memory_fraction: Optional[float] = Field(
        default=None, gt=0, le=1,
        description="torch.cuda.set_per_process_memory_fraction in the replica; default: num_gpus when below 1.")
    preemption_safe: bool = Field(
        default=False, description="May run on spot/preemptible nodes (see cluster.on_demand_resource).")
    max_surge_percent: int = Field(
        default=100, ge=0, le=100,
        description="Serve's surge on a rolling restart (a code or actor-option change): extra replicas, as a share "
                    "of the target, started before old ones stop, so a one-replica workload keeps serving.")

    @model_validator(mode="after")
    def _one_way_to_size(self):
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self

    @property
    def memory_cap(self) -> Optional[float]:
        return self.gpu_memory_fraction or (self.num_gpus if 0 < self.num_gpus < 1 else None)

    @property
    def admission_scale_max(self) -> float:
        """How far admission's caps may grow: with the running replicas over min_replicas (Admission.resize)."""
        return self.autoscaling.max_replicas / self.autoscaling.min_replicas if self.autoscaling else 1.0

    def info(self) -> dict:
        """For /info: how many replicas, where, and with what share of a GPU."""
        sizing = ({"autoscaling": {"min_replicas": self.autoscaling.min_replicas,
                                   "max_replicas": self.autoscaling.max_replicas}}
                  if self.autoscaling else {"num_replicas": self.num_replicas})
        return {**sizing, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "gpu_memory_cap": self.memory_cap, "preemption_safe": self.preemption_safe}


class Load(Strict):
    """How much work a replica takes at once and how much waits: Serve's bounds and the router's admission."""

    max_ongoing_requests: int = Field(default=64, ge=1, le=4096, description="Requests a replica runs at once.")
    max_queued_requests: int = Field(
        default=128, ge=1, description="Serve's bound on requests waiting for a replica, per caller (e.g. while one "
                                       "restarts); past it, 503 shed.")
    admission: AdmissionConfig = AdmissionConfig(max_in_flight=64, max_queued=256)


class Runtime(Strict):
    """Where and how a workload's model runs: what every workload shares."""

    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when the replica sees a "
                                                                               "GPU, else CPU.")
    offline: bool = Field(default=False, description="Set HF_HUB_OFFLINE=1 in the replica: never contact a model hub.")
    cache_dir: str = Field(default="~/.cache/torchrank-miner",
                           description="Where locally built or converted models are saved.")
    torch_threads: Optional[int] = Field(
        default=None, ge=1, description="Threads of the model's runtime; default: the replica's num_cpus, at least 1.")
    cpu_nice: int = Field(
        default=10, ge=0, le=19,
        description="Run the replica this much below normal CPU priority: when CPU runs out (a CPU-only host under "
                    "overload) the router keeps answering, and refusing, fast.")
    stuck_call_s: float = Field(default=300.0, gt=0, description="A model call running longer than this fails the "
                                                                 "health check, and Serve replaces the replica.")


class ProcessRuntime(Runtime):
    """A generative model: half precision on GPU, and by default in a child process of the replica."""

    fp16: bool = Field(default=True, description="Half precision on GPU (ignored on CPU).")
    engine_process: bool = Field(
        default=True, description="Run the model in a child process of the replica, with a GIL of its own: Serve's "
                                  "request handling no longer slows it (benchmarks/README.md).")


class EmbeddingsRuntime(Runtime):
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="What runs the model. auto: the fastest (backend, precision) measured for this host's kind that "
                    "passes min_cosine at start (CUDA: torch fp16; CPU: openvino bf16, torch bf16, openvino fp32, "
                    "onnxruntime fp32, torch fp32, bf16 only on a CPU with avx512_bf16 or amx_bf16). onnxruntime "
                    "and openvino run on CPU, from a model converted once and cached under cache_dir.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: the backend's fastest that passes min_cosine. fp16: CUDA and torch only; bf16: torch "
                    "(autocast) or openvino, on a CPU with bf16 instructions or on CUDA; onnxruntime runs fp32.")
    min_cosine: float = Field(
        default=0.9999, gt=0, le=1,
        description="At start the replica encodes a fixed probe set with its backend and with fp32 torch and "
                    "refuses to start when the lowest cosine between the two is below this.")
    stuck_call_s: float = Field(default=20.0, gt=0, description="A forward pass (well under a second) running longer "
                                                                "than this fails the health check, and Serve "
                                                                "replaces the replica.")

    @model_validator(mode="after")
    def _backend_can_run(self) -> "EmbeddingsRuntime":
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 runs on CUDA only: with device cpu use auto, fp32 or bf16")
        if self.precision == "fp16" and self.backend in ("onnxruntime", "openvino"):
            raise ValueError(f"precision fp16 runs on torch (CUDA) only, not on {self.backend}")
        if self.precision == "bf16" and self.backend == "onnxruntime":
            raise ValueError("backend onnxruntime runs fp32 only: use precision auto or fp32, or backend openvino or "
                             "torch for bf16")
        if self.backend in ("onnxruntime", "openvino") and self.device == "cuda":
            raise ValueError(f"backend {self.backend} runs on CPU only (the PyPI build): use device cpu or auto, or "
                             f"backend torch")
        return self


class DiffusionRuntime(ProcessRuntime):
    stuck_call_s: float = Field(default=600.0, gt=0, description="A pipeline call running longer than this fails "
                                                                 "the health check.")
    attention_slicing: bool = Field(default=False, description="Less GPU memory per call for some speed.")
    vae_tiling: bool = Field(default=False, description="Decode large images tile by tile: less GPU memory.")


# Flat names of release 0.1 -> where they live now; read for one more release, with a warning.
LEGACY_FIELDS = {
    "model": ("model", "id"), "served_model_name": ("model", "served_name"), "max_seq_length": ("model", "max_seq_length"),
    "max_new_tokens": ("model", "max_new_tokens"), "presets": ("model", "presets"),
    "default_preset": ("model", "default_preset"),
    "offline": ("runtime", "offline"), "device": ("runtime", "device"), "cache_dir": ("runtime", "cache_dir"),
    "torch_threads": ("runtime", "torch_threads"), "cpu_nice": ("runtime", "cpu_nice"),
    "stuck_call_s": ("runtime", "stuck_call_s"), "fp16": ("runtime", "fp16"),
    "engine_process": ("runtime", "engine_process"), "precision": ("runtime", "precision"),
    "min_cosine": ("runtime", "min_cosine"), "attention_slicing": ("runtime", "attention_slicing"),
    "vae_tiling": ("runtime", "vae_tiling"),
    "max_batch_texts": ("batching", "max_batch_texts"), "max_batch_images": ("batching", "max_batch_images"),
    "max_batch_sessions": ("batching", "max_batch_sessions"), "chunk_tokens": ("batching", "chunk_tokens"),
    "batch_wait_timeout_s": ("batching", "batch_wait_timeout_s"),
    "max_texts_per_request": ("limits", "max_texts_per_request"), "max_chars_per_text": ("limits", "max_chars_per_text"),
    "max_steps": ("limits", "max_steps"), "min_side": ("limits", "min_side"), "max_side": ("limits", "max_side"),
    "max_prompt_chars": ("limits", "max_prompt_chars"), "default_max_steps": ("limits", "default_max_steps"),
    "max_task_chars": ("limits", "max_task_chars"), "max_documents": ("limits", "max_documents"),
    "max_document_chars": ("limits", "max_document_chars"),
    "num_replicas": ("placement", "num_replicas"), "autoscaling": ("placement", "autoscaling"),
    "num_cpus": ("placement", "num_cpus"), "num_gpus": ("placement", "num_gpus"),
    "gpu_memory_fraction": ("placement", "gpu_memory_fraction"), "preemption_safe": ("placement", "preemption_safe"),
    "max_ongoing_requests": ("load", "max_ongoing_requests"), "max_queued_requests": ("load", "max_queued_requests"),
    "admission": ("load", "admission"),
}
legacy_log = logging.getLogger("ray.serve.torchrank.config")


class CanaryConfig(Strict):
    """A candidate model beside the stable one (serve_app/ops/rollout.py): shadowed first, then
    given a growing share of validators, then promoted, or rolled back at any stage."""

    model: str = Field(description="A hub id or local path: the candidate's model.id.")
    overrides: dict = Field(default_factory=dict, description="Sections of the workload's config that differ for the "
                                                              "candidate (e.g. runtime: {precision: bf16}), merged in.")
    placement: Optional[Placement] = Field(default=None, description="The candidate deployment's; default: the stable's.")
    weight: float = Field(default=0.5, gt=0, le=1, description="Share of validators (sticky by hotkey) the candidate "
                                                                "serves at the last step.")
    steps: tuple[float, ...] = Field(default=(0.1, 0.5, 1.0), min_length=1,
                                     description="The canary schedule: shares of `weight`, each held step_s.")
    step_s: float = Field(default=60.0, gt=0, description="Time with traffic in shadow and at each step.")
    min_comparisons: int = Field(default=20, ge=1, description="Comparisons needed in each stage before the next.")
    shadow_share: float = Field(default=0.1, gt=0, le=1, description="Share of admitted requests also sent to the "
                                                                     "other side, answers compared and discarded.")
    max_shadow_in_flight: int = Field(default=4, ge=1, description="Mirrored calls at once per router replica; more "
                                                                   "are not mirrored (shadowing never queues).")
    min_samples: int = Field(default=10, ge=1, description="Comparisons or candidate calls a rollback verdict needs.")
    min_agreement: float = Field(default=0.95, gt=0, le=1, description="Share of comparisons that must agree.")
    min_cosine: float = Field(default=0.99, gt=-1, le=1, description="Embeddings agree: every vector's cosine to the "
                                                                     "stable one at least this.")
    max_pixel_diff: float = Field(default=2.0, ge=0, le=255, description="Images agree: mean absolute difference of "
                                                                         "the seeded images' pixels (0-255) at most this.")
    max_error_increase: float = Field(default=0.05, ge=0, le=1, description="Roll back when the candidate's failure rate "
                                                                            "(errors; agents also step limits) exceeds "
                                                                            "the stable's by more.")
    max_latency_ratio: float = Field(default=2.0, ge=1, description="Roll back when the candidate's p95 over the same "
                                                                    "requests exceeds the stable's by this factor...")
    latency_slack_s: float = Field(default=0.05, ge=0, description="...plus this.")

    @field_validator("steps")
    @classmethod
    def _steps_grow_to_one(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)) or steps[-1] != 1:
            raise ValueError("steps must rise, each in (0, 1], and end at 1 (the full weight)")
        return steps


class Workload(Strict):
    """What every workload's config has: its model, how it runs, batches and limits requests,
    where its replicas run, and how much load they take. Each workload narrows the sections."""

    workload: ClassVar[str]  # its field under `workloads:`
    placement: Placement = Placement()  # the same for every workload; the other sections are narrowed per workload
    canary: Optional[CanaryConfig] = Field(default=None, description="A candidate model rolled out beside this one.")

    def candidate(self) -> "Workload":
        """The candidate deployment's config: the canary's model, overrides and placement, no canary."""
        canary = self.canary
        given = {**canary.overrides, "model": {**canary.overrides.get("model", {}), "id": canary.model}, "canary": None}
        if canary.placement is not None:
            given["placement"] = canary.placement
        return type(self).model_validate(over(self, given, whole=True))

    @classmethod
    def _read_legacy_names(cls, data: dict) -> dict:
        """Release 0.1's flat fields (e.g. `offline`, `max_batch_texts`) still work, moved to their
        section with a deprecation warning naming the new place."""
        moved = []
        if isinstance(data.get("model"), str):
            data["model"] = {"id": data["model"]}
            moved.append(("model", "model.id"))
        if isinstance(data.get("runtime"), str):  # embeddings' `runtime` was the backend's name
            data["runtime"] = {"backend": data["runtime"]}
            moved.append(("runtime", "runtime.backend"))
        for old in [key for key in data if key in LEGACY_FIELDS and key not in cls.model_fields]:
            section, new = LEGACY_FIELDS[old]
            target = dict(data.get(section) or {})
            if new in target:
                raise ValueError(f"{old} and {section}.{new} are the same field: keep {section}.{new}")
            target[new] = data.pop(old)
            data[section] = target
            moved.append((old, f"{section}.{new}"))
        if moved:
            msg = (f"workloads.{cls.workload}: deprecated field names, read until release 0.3 (see CHANGELOG): "
                   + ", ".join(f"{old} -> {new}" for old, new in moved))
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            legacy_log.warning(msg)
        return data

    @property
    def batch_items(self) -> int:
        """Items one model call takes: the autoscaler's default queue target per replica."""
        raise NotImplementedError

    @property
    def in_flight_items(self) -> float:
        """Work the router sends ahead to each replica (load.admission.in_flight_items; default two full batches)."""
        return self.load.admission.in_flight_items or 2 * self.batch_items

    @property
    def admission_holds_max(self) -> int:
        """The most requests admission may hold per router replica (at the workload and queued), rounded as it does."""
        scale, caps = self.placement.admission_scale_max, self.load.admission
        return math.ceil(caps.max_in_flight * scale) + math.ceil(caps.max_queued * scale)


class EmbeddingsModel(Strict):
    id: str = Field(default="sentence-transformers/all-MiniLM-L6-v2",
                    description="A hub id or a local directory of a sentence-transformers model.")
    served_name: Optional[str] = Field(default=None, description="The name in responses; default: the id's last "
                                                                 "path part.")
    max_seq_length: Optional[int] = Field(default=None, ge=8, le=8192,
                                          description="Cut texts to this many tokens; default: the model's own.")

    @property
    def name(self) -> str:
        return self.served_name or self.id.rstrip("/").split("/")[-1]


class EmbeddingsBatching(Strict):
    """Texts of concurrent requests share forward passes. With a zero wait a lone request runs
    at once; requests arriving during a pass form the next batch."""

    max_batch_texts: int = Field(default=64, ge=1, le=4096)
    chunk_tokens: Optional[int] = Field(
        default=None, ge=16,
        description="Padded tokens per forward chunk of a batch. Default: 512 on CPU (activations stay in cache; "
                    "benchmarks/README.md), 16384 on GPU.")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=1)


class EmbeddingsLimits(Strict):
    """Per request; over them, 422 naming the field."""

    max_texts_per_request: int = Field(default=64, ge=1)
    max_chars_per_text: int = Field(default=8192, ge=1)


class EmbeddingsConfig(Workload):
    workload = "embeddings"
    model: EmbeddingsModel = EmbeddingsModel()
    runtime: EmbeddingsRuntime = EmbeddingsRuntime()
    batching: EmbeddingsBatching = EmbeddingsBatching()
    limits: EmbeddingsLimits = EmbeddingsLimits()
    load: Load = Load(max_ongoing_requests=128, max_queued_requests=256, admission=AdmissionConfig())
    degraded: Optional[EmbeddingsDegradation] = EmbeddingsDegradation()

    @model_validator(mode="after")
    def _request_fits_a_batch(self) -> "EmbeddingsConfig":
        if self.limits.max_texts_per_request > self.batching.max_batch_texts:
            raise ValueError(
                f"limits.max_texts_per_request ({self.limits.max_texts_per_request}) must not exceed "
                f"batching.max_batch_texts ({self.batching.max_batch_texts}): one request must fit in one batch")
        return self

    @property
    def batch_items(self) -> int:
        return self.batching.max_batch_texts


class DiffusionPreset(Strict):
    """One quality/cost point: what a request naming this preset runs."""

    steps: int = Field(ge=1, le=200)
    width: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    height: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    scheduler: Literal["default", "ddim", "euler", "euler_a", "dpm"] = "default"


TINY_DIFFUSION_PRESETS = {
    "fast": DiffusionPreset(steps=2, width=64, height=64, guidance_scale=1.0),
    "balanced": DiffusionPreset(steps=4, width=64, height=64),
    "quality": DiffusionPreset(steps=8, width=64, height=64, scheduler="dpm"),
}


class DiffusionModel(Strict):
    id: str = Field(default="torchrank/tiny-sd",
                    description="A hub id or local path of a diffusers pipeline; torchrank/tiny-sd is built locally.")
    presets: dict[str, DiffusionPreset] = Field(default_factory=lambda: dict(TINY_DIFFUSION_PRESETS))
    default_preset: str = "balanced"

    @model_validator(mode="after")
    def _default_is_a_preset(self) -> "DiffusionModel":
        if self.default_preset not in self.presets:
            raise ValueError(f"default_preset {self.default_preset!r} is not one of the presets {sorted(self.presets)}")
        return self


class DiffusionBatching(Strict):
    max_batch_images: int = Field(
        default=4, ge=1, le=64,
        description="Images per pipeline call, and the most one request may ask for. Every call runs exactly this "
                    "many (padded): the same shapes every time, so a seeded image is the same bytes alone or batched.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, le=1, description="Wait this long for more requests before an idle replica starts a call.")


class DiffusionLimits(Strict):
    """Per request; over them, 422 naming the field. A request may ask for other steps or another
    size than its preset's, within these bounds; the preset keeps its guidance and scheduler."""

    max_steps: int = Field(default=50, ge=1, le=200)
    min_side: int = Field(default=64, ge=8, multiple_of=8)
    max_side: int = Field(default=1024, ge=8, le=4096, multiple_of=8)
    max_prompt_chars: int = Field(default=1000, ge=1)

    _sides = model_validator(mode="after")(lambda self: not_above(self, "min_side", "max_side"))


class DiffusionConfig(Workload):
    """Text-to-image through diffusers: presets, padded batches, a result cache."""

    workload = "diffusion"

    model: DiffusionModel = DiffusionModel()
    runtime: DiffusionRuntime = DiffusionRuntime()
    batching: DiffusionBatching = DiffusionBatching()
    limits: DiffusionLimits = DiffusionLimits()
    load: Load = Load()
    cache_bytes: int = Field(default=256 << 20, ge=0, description="Result cache (PNG bytes) per replica; 0 turns it off.")

    @property
    def batch_items(self) -> int:
        return self.batching.max_batch_images

    @model_validator(mode="after")
    def _presets_within_limits(self) -> "DiffusionConfig":
        limits = self.limits
        for name, preset in self.model.presets.items():
            if preset.steps > limits.max_steps:
                raise ValueError(f"preset {name!r}: {preset.steps} steps, over limits.max_steps ({limits.max_steps})")
            for side in (preset.width, preset.height):
                if not limits.min_side <= side <= limits.max_side:
                    raise ValueError(f"preset {name!r}: size {preset.width}x{preset.height} is outside "
                                     f"limits.min_side..max_side ({limits.min_side}..{limits.max_side})")
        return self


class ToolConfig(Strict):
    enabled: bool = True
    timeout_s: float = Field(default=5.0, gt=0, le=300, description="Per call; the run's deadline may cut it shorter.")
    retries: int = Field(default=0, ge=0, le=5, description="Further tries after a retryable failure (timeout, 5xx).")


FETCH_DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchToolConfig(ToolConfig):
    """HTTP GET for the agent: off unless enabled, only to the listed origins, and only where
    they resolve to public addresses (serve_app/agents/tools.py make_fetch)."""

    enabled: bool = False
    retries: int = Field(default=2, ge=0, le=5)
    allowed_hosts: tuple[str, ...] = Field(
        default=(), description="Origins the agent may GET from: scheme://host[:port] (http or https; the port "
                                "defaults to the scheme's) or a bare host name, which means https on port 443 only. "
                                "Kept as scheme://host:port.")
    max_bytes: int = Field(default=65536, ge=1, le=1 << 22)

    @field_validator("allowed_hosts")
    @classmethod
    def _as_origins(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cls.origin_text(*cls.origin(entry)) for entry in entries))

    @staticmethod
    def origin(entry: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an allow-list entry; ValueError saying what is wrong otherwise."""
        if "://" not in entry:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", entry):
                raise ValueError(f"allowed_hosts entry {entry!r}: a bare host name, or scheme://host:port")
            return "https", entry.lower(), FETCH_DEFAULT_PORTS["https"]
        from urllib.parse import urlsplit

        parts = urlsplit(entry)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (parts.scheme not in FETCH_DEFAULT_PORTS or not parts.hostname or parts.username is not None
                or parts.path not in ("", "/") or parts.query or parts.fragment or port == -1):
            raise ValueError(f"allowed_hosts entry {entry!r}: only http(s)://host[:port], no path or credentials")
        return parts.scheme, parts.hostname, port or FETCH_DEFAULT_PORTS[parts.scheme]

    @staticmethod
    def origin_text(scheme: str, host: str, port: int) -> str:
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


class AgentToolsConfig(Strict):
    calculator: ToolConfig = ToolConfig(timeout_s=1.0)
    scratchpad: ToolConfig = ToolConfig(timeout_s=1.0)
    retrieve: ToolConfig = ToolConfig(timeout_s=5.0, retries=1)
    http_fetch: FetchToolConfig = FetchToolConfig()

    def offered(self, embeddings: bool) -> list[str]:
        """The tool names this miner offers (retrieve needs the embeddings workload)."""
        names = [name for name in ("calculator", "scratchpad") if getattr(self, name).enabled]
        if self.retrieve.enabled and embeddings:
            names.append("retrieve")
        if self.http_fetch.enabled and self.http_fetch.allowed_hosts:
            names.append("http_fetch")
        return names


class AgentsModel(Strict):
    id: str = Field(default="torchrank/tiny-lm",
                    description="A hub id or local path of a chat causal LM; torchrank/tiny-lm is built locally.")
    max_new_tokens: int = Field(default=96, ge=1, le=4096, description="Per model step; an action not finished by then is "
                                "closed (a few tokens more, serve_app/engines/llm.py).")


class AgentsBatching(Strict):
    max_batch_sessions: int = Field(default=64, ge=1, le=1024, description="Sessions decoding together at most.")
    scheduling: Literal["continuous", "static"] = Field(
        default="continuous", description="continuous: a step joins the running batch and leaves it when its action "
                                          "is complete; static: a batch is formed when the last one has finished.")


class AgentsLimits(Strict):
    """Per request; over them, 422 naming the field."""

    default_max_steps: int = Field(default=8, ge=1)
    max_steps: int = Field(default=16, ge=1, le=100, description="The most a request may ask for.")
    max_task_chars: int = Field(default=4000, ge=1)
    max_documents: int = Field(default=32, ge=0)
    max_document_chars: int = Field(default=4000, ge=1)

    _steps = model_validator(mode="after")(lambda self: not_above(self, "default_max_steps", "max_steps"))


class AgentsConfig(Workload):
    """Multi-step tool use with a causal LM: many sessions' steps batched into shared passes.
    A replica runs at most load.max_ongoing_requests sessions at once; Serve queues the next
    load.max_queued_requests per caller, then refuses (503 shed)."""

    workload = "agents"

    engine: Literal["transformers", "vllm"] = Field(
        default="transformers", description="transformers (any host) or vllm (GPU hosts with `pip install "
                                            "torchrank-miner[vllm]`): the same action grammar either way.")
    model: AgentsModel = AgentsModel()
    runtime: ProcessRuntime = ProcessRuntime()
    batching: AgentsBatching = AgentsBatching()
    limits: AgentsLimits = AgentsLimits()
    load: Load = Load(max_ongoing_requests=64, max_queued_requests=64, admission=AdmissionConfig(max_in_flight=64,
                                                                                                  max_queued=256))
    tools: AgentToolsConfig = AgentToolsConfig()

    @property
    def batch_items(self) -> int:
        return self.batching.max_batch_sessions

    @property
    def in_flight_items(self) -> float:
        # A replica runs max_ongoing_requests sessions at once: more would only queue inside Serve.
        return self.load.admission.in_flight_items or self.load.max_ongoing_requests


class WorkloadsConfig(Strict):
    embeddings: Optional[EmbeddingsConfig] = EmbeddingsConfig()
    diffusion: Optional[DiffusionConfig] = None
    agents: Optional[AgentsConfig] = None


class EdgeConfig(Strict):
    """What HAProxy refuses before a request reaches Python (deployments/haproxy/edge.cfg,
    serve_app/router/edge.py): missing auth headers, hotkeys the metagraph refuses, unknown routes
    and methods, rates, and the stake tiers admission is shedding. Only with HAProxy in front."""

    enabled: bool = Field(default=True, description="Keep HAProxy's maps current; off, HAProxy refuses nothing itself.")
    stranger_rps: float = Field(
        default=20.0, gt=0, description="Requests/s HAProxy lets through from a client address that has not sent a "
                                        "verified request lately (a stranger claiming a validator's hotkey is held "
                                        "to this); addresses validators sign from are not limited by it.")
    trusted_s: float = Field(default=3600.0, gt=0, description="How long an address stays trusted after its last "
                                                               "verified request.")
    sync_s: float = Field(default=0.25, gt=0, le=5, description="How often each router writes its state and the "
                                                                "leader updates HAProxy's maps.")


class RouterConfig(Strict):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(
        default=4096, ge=1, description="Serve's bound on requests inside one router replica; past it they queue in "
                                        "Serve, unseen by the miner's own gate: keep it at least max_in_progress.")
    max_in_progress: int = Field(
        default=1024, ge=1, description="Requests inside one router replica at once; beyond it, 503 before reading them. "
                                        "At least what admission may hold for the workloads the routes use "
                                        "(max_in_flight + max_queued, at max_replicas when autoscaled): checked.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Larger bodies get 413 before being read.")
    body_timeout_s: float = Field(default=10.0, gt=0, description="A body slower than this to arrive gets 408.")
    min_body_bytes_per_s: float = Field(
        default=65536, gt=0, description="After body_grace_s, a body arriving slower than this gets 408: a client "
                                         "trickling bytes cannot hold a router slot for body_timeout_s.")
    body_grace_s: float = Field(default=1.0, gt=0, description="Time any body gets before the rate applies.")
    edge: EdgeConfig = EdgeConfig()
    max_body_reads: int = Field(
        default=128, ge=1, description="Bodies read at once per router replica: callers not authenticated yet. When "
                                       "full, a newcomer cuts the read that has lasted longest (408).")

    @model_validator(mode="after")
    def _gate_sees_every_request(self) -> "RouterConfig":
        if self.max_ongoing_requests < self.max_in_progress:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_in_progress "
                             f"({self.max_in_progress}): requests past it would wait inside Serve, where neither "
                             f"admission nor the entry gate can refuse them")
        return self


class ClusterConfig(Strict):
    """Placement on a multi-node cluster (cluster.yaml); nothing to set on one machine."""

    on_demand_resource: Optional[str] = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="A custom resource only on-demand nodes advertise (cluster.yaml: on_demand). Set, the router and "
                    "every workload not marked preemption_safe require a sliver of it: they never land on spot nodes.")


class ResourcePrices(Strict):
    """The price of what a replica holds, per unit (a whole CPU core, a whole GPU) and hour: the
    node type's price divided by its units. Power is the draw of those units, at economics.power_per_kwh
    (leave it 0 where the hourly price already includes power, as cloud prices do)."""

    cpu_per_hour: float = Field(default=0.0, ge=0, description="Currency per CPU core-hour held.")
    gpu_per_hour: float = Field(default=0.0, ge=0, description="Currency per GPU-hour held.")
    cpu_watts: float = Field(default=0.0, ge=0, description="Watts one CPU core draws.")
    gpu_watts: float = Field(default=0.0, ge=0, description="Watts one GPU draws.")


class CandidateSubnet(Strict):
    """A subnet not served yet, for `torchrank-miner economics --pick`."""

    netuid: int = Field(ge=0, le=65535)
    name: str = ""
    workload: Literal["embeddings", "diffusion", "agents"]
    reward: RewardConfig = RewardConfig()
    tao_per_day: Optional[float] = Field(default=None, ge=0, description="With reward.source chain: the emission a "
                                                                          "miner there earns a day (a published figure).")
    tasks_per_hour: Optional[float] = Field(default=None, gt=0, description="Tasks its validators send a miner an "
                                                                            "hour; default: as many as it can answer.")
    acceptance: float = Field(default=0.95, gt=0, le=1, description="Share of tasks expected to be accepted.")


class EconomicsConfig(Strict):
    """Prices and rewards: what `torchrank-miner economics` and the ledger turn the miner's own
    figures into money with (serve_app/economics/money.py)."""

    currency: str = Field(default="USD", min_length=1, max_length=8)
    tao_price: float = Field(gt=0, description="Currency per TAO: a fixed figure (update it as the market moves).")
    prices: ResourcePrices = Field(default=ResourcePrices(), description="For every workload and the router.")
    workloads: dict[Literal["router", "embeddings", "diffusion", "agents"], ResourcePrices] = Field(
        default_factory=dict, description="Per workload, in place of prices: one placed on another node type.")
    power_per_kwh: float = Field(default=0.0, ge=0)
    ops_per_month: float = Field(default=0.0, ge=0, description="Monitoring, storage, your time: shared equally "
                                                                "by the subnets.")
    egress_per_gb: float = Field(default=0.0, ge=0, description="Currency per GB of response bytes.")
    candidates: tuple[CandidateSubnet, ...] = Field(default=(), description="Subnets not served yet, ranked by "
                                                                            "`economics --pick` beside the served.")

    def prices_of(self, workload: str) -> ResourcePrices:
        return self.workloads.get(workload, self.prices)


class VerdictRules(Strict):
    """The miner guide's timing: "gather 7-14 day consistency data"; "scale after 2-4 weeks of
    stable score + positive unit economics"."""

    stable_days: int = Field(default=14, ge=1, description="Days in a row of SLOs met for `stable`.")
    recent_days: int = Field(default=7, ge=1, description="A miss in this many last days means `hold`.")
    expand_days: int = Field(default=21, ge=1, description="Days in a row of SLOs met, with a profit over them, "
                                                           "for `expand`.")

    @model_validator(mode="after")
    def _ordered(self) -> "VerdictRules":
        not_above(self, "recent_days", "stable_days")
        return not_above(self, "stable_days", "expand_days")


class LedgerConfig(Strict):
    """The consistency ledger: a SQLite file of each subnet's days (serve_app/economics/ledger.py)."""

    path: str = Field(default="~/.local/state/torchrank-miner/ledger.sqlite",
                      description="On the head node; a relative path is relative to where the miner starts.")
    day_s: float = Field(default=86400.0, gt=0, description="The length of a ledger day: shorter only to test "
                                                            "weeks in seconds.")
    origin_s: float = Field(default=0.0, description="Unix time a day starts at (0: UTC midnight).")
    keep_days: int = Field(default=400, ge=35, description="Days kept; older ones are deleted.")
    flush_s: float = Field(default=5.0, gt=0, description="How often each router replica hands its counts on.")
    verdict: VerdictRules = VerdictRules()


class MinerConfig(Strict):
    name: str = Field(default="torchrank-miner", description="Used for the shared replay store's actor name.")
    wallet: WalletConfig
    subnets: tuple[SubnetConfig, ...]
    workloads: WorkloadsConfig = WorkloadsConfig()
    router: RouterConfig = RouterConfig()
    cluster: ClusterConfig = ClusterConfig()
    economics: Optional[EconomicsConfig] = Field(default=None, description="Prices and rewards; without them the "
                                                                           "ledger counts tasks but no money.")
    ledger: LedgerConfig = LedgerConfig()

    def latency_slo_s(self, workload: str) -> float:
        """The strictest latency SLO among the subnets with a route to `workload`."""
        return min((s.slo.latency_s for s in self.subnets
                    if any(PROTOCOLS[r.protocol].workload == workload for r in s.routes)), default=SLOConfig().latency_s)

    def _check_full_paths_unique(self) -> None:
        # The router keys its route table by prefix + path: a second subnet's route would replace the first's.
        owners: dict[str, SubnetConfig] = {}
        for subnet in self.subnets:
            for route in subnet.routes:
                path = subnet.prefix + route.path
                first = owners.setdefault(path, subnet)
                if first is not subnet:
                    raise ValueError(f"subnets: {path} is a route of both subnet {first.netuid} (prefix "
                                     f"{first.prefix!r}) and subnet {subnet.netuid} (prefix {subnet.prefix!r}); "
                                     f"each full path (prefix + route path) must be unique")

    def _check_gate_holds_admission(self) -> None:
        # A gate below what admission may hold sheds at the door what admission would have ranked by stake.
        used = dict.fromkeys(PROTOCOLS[r.protocol].workload for s in self.subnets for r in s.routes)
        parts, total = [], 0
        for name in used:
            workload = getattr(self.workloads, name)
            caps = f"{workload.load.admission.max_in_flight}+{workload.load.admission.max_queued}"
            scale = workload.placement.admission_scale_max
            parts.append(f"{name} {caps}" if scale == 1 else f"{name} ({caps}) x {scale:g}")
            total += workload.admission_holds_max
        # Bodies being read count at the gate too, before they reach admission.
        parts.append(f"router.max_body_reads {self.router.max_body_reads}")
        total += self.router.max_body_reads
        if self.router.max_in_progress < total:
            raise ValueError(
                f"router.max_in_progress ({self.router.max_in_progress}) is below the {total} requests admission "
                f"and the body reads may hold per router replica (workloads.<name>.load.admission max_in_flight+"
                f"max_queued, x max_replicas/min_replicas when autoscaled, + router.max_body_reads: "
                f"{', '.join(parts)}): the entry gate would shed what admission "
                f"ranks by stake. Raise router.max_in_progress to at least {total} (router.max_ongoing_requests, "
                f"{self.router.max_ongoing_requests}, must stay at least it) or lower those caps")

    @field_validator("subnets")
    @classmethod
    def _at_least_one_subnet(cls, subnets: tuple[SubnetConfig, ...]) -> tuple[SubnetConfig, ...]:
        # Not Field(min_length=1): pydantic counts only the items that validated, so one subnet with a
        # typo would also report "Tuple should have at least 1 item" beside the real error.
        if not subnets:
            raise ValueError("at least one subnet is required")
        return subnets

    @model_validator(mode="after")
    def _consistent(self) -> "MinerConfig":
        netuids = [s.netuid for s in self.subnets]
        if len(set(netuids)) != len(netuids):
            raise ValueError(f"subnets: duplicate netuid in {netuids}")
        prefixes = [s.prefix for s in self.subnets]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"subnets: two subnets share a prefix in {prefixes}; give each its own")
        self._check_full_paths_unique()
        if self.wallet.is_dev_key:
            live = [s.netuid for s in self.subnets if s.metagraph.source != "snapshot"]
            if live:
                raise ValueError(
                    f"wallet.uri {self.wallet.uri} is a public dev key: it is refused with a live chain "
                    f"metagraph (subnets {live}); use a wallet on disk, or a snapshot metagraph for local use"
                )
        for subnet in self.subnets:
            for route in subnet.routes:
                workload = PROTOCOLS[route.protocol].workload
                if getattr(self.workloads, workload) is None:
                    raise ValueError(
                        f"subnet {subnet.netuid} route {route.path} needs workload {workload!r}, which is disabled"
                    )
            diffusion, policy = self.workloads.diffusion, subnet.diffusion
            if diffusion is not None:
                named = [p for p in (policy.default_preset, *policy.allowed_presets) if p is not None]
                unknown = sorted(set(named) - set(diffusion.model.presets))
                if unknown:
                    raise ValueError(f"subnet {subnet.netuid} diffusion: unknown presets {unknown}; "
                                     f"the model has {sorted(diffusion.model.presets)}")
                default = policy.default_preset or diffusion.model.default_preset
                if policy.allowed_presets and default not in policy.allowed_presets:
                    raise ValueError(f"subnet {subnet.netuid} diffusion: the default preset {default!r} "
                                     f"is not among allowed_presets {list(policy.allowed_presets)}")
                self._check_subnet_diffusion_limits(subnet.netuid, policy, diffusion, default)
        self._check_gate_holds_admission()
        return self

    @staticmethod
    def _check_subnet_diffusion_limits(netuid: int, policy: SubnetDiffusion, diffusion: DiffusionConfig,
                                       default: str) -> None:
        """A subnet may only lower the workload's limits, and the presets it names must fit its own."""
        if policy.max_steps is not None and policy.max_steps > diffusion.limits.max_steps:
            raise ValueError(f"subnet {netuid} diffusion: max_steps ({policy.max_steps}) is above the "
                             f"workload's ({diffusion.limits.max_steps})")
        if policy.max_side is not None and policy.max_side > diffusion.limits.max_side:
            raise ValueError(f"subnet {netuid} diffusion: max_side ({policy.max_side}) is above the "
                             f"workload's ({diffusion.limits.max_side})")
        if policy.max_side is not None and policy.max_side < diffusion.limits.min_side:
            raise ValueError(f"subnet {netuid} diffusion: max_side ({policy.max_side}) is below the "
                             f"workload's min_side ({diffusion.limits.min_side}): no size would be allowed")
        max_steps, max_side = policy.max_steps or diffusion.limits.max_steps, policy.max_side or diffusion.limits.max_side
        for name in dict.fromkeys((default, *policy.allowed_presets)):
            preset = diffusion.model.presets[name]
            if preset.steps > max_steps:
                raise ValueError(f"subnet {netuid} diffusion: preset {name!r}: {preset.steps} steps, over the "
                                 f"subnet's max_steps ({max_steps})")
            if max(preset.width, preset.height) > max_side:
                raise ValueError(f"subnet {netuid} diffusion: preset {name!r}: size {preset.width}x{preset.height} "
                                 f"is over the subnet's max_side ({max_side})")
