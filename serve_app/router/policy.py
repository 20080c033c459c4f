"""Authorisation: may this authenticated hotkey use this subnet's routes?"""

from __future__ import annotations

import math
from typing import Optional

from serve_app.chain.metagraph import MetagraphView
from serve_app.config import AuthPolicy, SubnetConfig
from serve_app.errors import ApiError, ErrorCode, unavailable


def authorise(hotkey: str, view: Optional[MetagraphView], policy: AuthPolicy) -> None:
    """Return if admitted; raise ApiError (403, or 503 with no metagraph yet or one past its max age) otherwise."""
    if hotkey in policy.deny_hotkeys:
        raise ApiError(ErrorCode.denied, "this hotkey is deny-listed by the miner")
    if hotkey in policy.allow_hotkeys:
        return
    if view is None:
        raise unavailable("the subnet's metagraph has not been loaded yet", retry_after_s=5)
    if view.expired:
        # Trusting it longer would keep a deregistered validator's access for as long as the outage lasts.
        raise unavailable(f"the metagraph of subnet {view.netuid} is {view.age_s:.0f}s old, past its max_age_s "
                          f"({view.max_age_s:g}s): the miner cannot read the chain, so only allow-listed hotkeys "
                          f"are admitted", retry_after_s=30)
    neuron = view.neuron(hotkey)
    if neuron is None:
        raise ApiError(ErrorCode.not_registered, f"hotkey is not registered on subnet {view.netuid}")
    if policy.require_validator_permit and not neuron.validator_permit:
        raise ApiError(ErrorCode.no_validator_permit, f"hotkey has no validator permit on subnet {view.netuid}")
    if neuron.stake < policy.min_stake:
        raise ApiError(ErrorCode.insufficient_stake, f"stake {neuron.stake:g} is below the minimum {policy.min_stake:g}")


def caller_class(hotkey: str, view: Optional[MetagraphView], policy: AuthPolicy) -> str:
    """A bounded label for metrics and logs (never the raw hotkey in a metric)."""
    if hotkey in policy.deny_hotkeys:
        return "denied"
    if hotkey in policy.allow_hotkeys:
        return "allow_listed"
    neuron = view.neuron(hotkey) if view is not None else None
    if neuron is None:
        return "unregistered"
    return "validator" if neuron.validator_permit else "registered"


TIMEOUT_HEADER = "X-Bittensor-Timeout"


def request_timeout(headers, subnet: SubnetConfig) -> float:
    """Seconds the validator will wait: its X-Bittensor-Timeout, else the subnet's default,
    capped at the subnet's max_timeout_s. A malformed value is a 422 naming the header."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return subnet.timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ApiError(ErrorCode.invalid_timeout, f"{TIMEOUT_HEADER} must be a positive number of seconds")
    return min(value, subnet.max_timeout_s)


def waited_s(received_ms: Optional[str], now: float, timeout_s: float) -> float:
    """How long the request waited before the router got to it, from HAProxy's stamp
    (X-Torchrank-Received, ms since the epoch; `now` time.time()), at most its whole timeout: the
    caller's deadline runs from its arrival. 0 without a usable stamp (a request not through HAProxy)."""
    try:
        return min(max(0.0, now - int(received_ms) / 1000), timeout_s)
    except (TypeError, ValueError):
        return 0.0


def priority(hotkey: str, view: Optional[MetagraphView], policy: AuthPolicy) -> float:
    """Queue priority: the caller's stake; allow-listed hotkeys (the operator's own) go first."""
    if hotkey in policy.allow_hotkeys:
        return math.inf
    neuron = view.neuron(hotkey) if view is not None else None
    return neuron.stake if neuron is not None else 0.0
