"""`torchrank-miner`: the operator's command.

  torchrank-miner validator embed "some text"     sign as //Alice, call the miner, print the result
  torchrank-miner validator image "a prompt"      the same for text-to-image; PNGs written to files
  torchrank-miner validator agent "a task"        the same for an agent run; prints its steps
  torchrank-miner config check deployments/x.yaml validate a serve config's miner args
  torchrank-miner status                          per-subnet req/s, latency, error budget, queues
  torchrank-miner publish [--dry-run]             publish subnets[].endpoint as the hotkey's axon where
                                                  the chain holds another (run where the wallet lives)
  torchrank-miner rollout status [--json]         each canary's state; `rollout promote|rollback
                                                  --workload W` decides by hand
  torchrank-miner economics [--window 24h]        per subnet: tasks, revenue, cost, profit, unit cost;
                                                  `--pick` ranks subnets by expected profit an hour
  torchrank-miner ledger [--json]                 each subnet's days and its verdict: hold, stable, expand
  torchrank-miner report --out report.html        the operator's report: one HTML file with charts
  torchrank-miner simulate [--seconds 60]         simulated validators score the running miner; the verdict
                                                  says whether it would hold its score at that load

A relative --config (default deployments/local.yaml) is looked up in the current directory,
then in the checkout. An error is one line on stderr (a bad config: one per problem) and
exit status 1 when the miner, the chain or the config said no, 2 when it could not get that far
(no miner answering, no such file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "deployments/local.yaml"
MAX_SIMULATED = 2_000_000  # requests in one simulate run: every attempt is kept for the scores
# The checkout (an editable install): where the shipped deployments/ lives.
REPO = Path(__file__).resolve().parent.parent


class CliError(Exception):
    """What the user is told: one line on stderr, and the exit code (1: the miner or the config
    said no; 2: the command could not get that far). `main` prints it; commands only raise."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def resolve_config(name: str) -> tuple[Path, Path | None]:
    """(the file to read, the directory its relative snapshot paths are relative to: None for
    the current one).

    A relative path is looked up in the current directory first, then in the checkout (the
    shipped deployments/*.yaml, whose snapshot paths are relative to the checkout), so the
    default works from any directory."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path, None
    shipped = REPO / path
    if shipped.exists():
        return shipped, REPO
    raise CliError(f"serve config {name} not found: tried {Path.cwd() / path} and {shipped}")


def _config(args):
    from serve_app.app import check_config_file

    path, _ = resolve_config(args.config)
    return path, check_config_file(path, startable=False)[0]


def _miner_hotkey(args) -> str:
    if args.miner_hotkey:
        return args.miner_hotkey
    from serve_app.app import ConfigError

    path, cfg = _config(args)
    try:
        return cfg.wallet.hotkey_ss58()
    except ValueError as exc:  # the wallet's public hotkey cannot be read
        raise ConfigError(path, [f"wallet: {exc} (or pass --miner-hotkey)"]) from None


def _scheme(args) -> str:
    """--scheme, else the auth.scheme of the subnet in --config that serves --path (btauth if none does)."""
    if args.scheme:
        return args.scheme
    try:
        _, cfg = _config(args)
    except CliError:
        if args.miner_hotkey:  # a validator elsewhere, with no config at hand
            return "btauth"
        raise
    return next((s.auth.scheme for s in cfg.subnets for r in s.routes if s.prefix + r.path == args.path), "btauth")


def _http_error(resp) -> CliError:
    """`HTTP 403 not_registered: <detail>` from the miner's JSON error; HAProxy's own pages may be text."""
    try:
        data = resp.json()
        code, detail = data["error"], data.get("detail", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = " ".join(resp.text.split())
        code, detail = resp.reason_phrase, text[:200] + ("..." if len(text) > 200 else "")
    retry = resp.headers.get("retry-after")
    return CliError(f"HTTP {resp.status_code} {code}: {detail}" + (f" (retry after {retry} s)" if retry else ""),
                    code=1)


def _read_events(resp, on_event) -> dict:
    """A Server-Sent Events answer: on_event(name, data) for each event as it arrives; returns
    the data of the last one, which must be `answer` (an `error` event is a CliError)."""
    name, data, last = None, None, None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
        elif not line and name is not None:
            if name == "error":
                raise CliError(f"the run failed: {data.get('code')}: {data.get('message')}", code=1)
            on_event(name, data)
            name, last = None, (name, data)
    if last is None or last[0] != "answer":
        raise CliError("the miner's event stream ended without an answer", code=1)
    return last[1]


def _call_signed(args, payload: dict, on_event=None):
    """(response, its JSON) for one signed POST to args.path; CliError when there is no good answer.
    With `on_event` the answer is an event stream (payload "stream": true): see _read_events."""
    import httpx

    from serve_app.client import signed_request, signer_for

    try:
        signer = signer_for(args.key, args.wallet_name, args.wallet_hotkey, args.wallet_path)
    except ValueError as exc:
        raise CliError(f"--key {args.key}: {exc}") from None
    receiver = _miner_hotkey(args)
    try:
        body, headers = signed_request(signer, args.path, payload, receiver, scheme=_scheme(args))
    except OSError as exc:  # a wallet whose hotkey file is missing or unreadable
        raise CliError(f"cannot sign with wallet {args.wallet_name!r}/{args.wallet_hotkey!r} under "
                       f"{args.wallet_path}: {exc}") from None
    url = args.url.rstrip("/") + args.path
    try:
        if on_event is not None:
            with httpx.stream("POST", url, content=body, headers=headers, timeout=args.timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _http_error(resp)
                return resp, _read_events(resp, on_event)
        resp = httpx.post(url, content=body, headers=headers, timeout=args.timeout)
    except httpx.TimeoutException:
        raise CliError(f"no answer from the miner at {url} within {args.timeout:g} s (--timeout)") from None
    except httpx.ConnectError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else str(exc)
        raise CliError(f"cannot reach the miner at {url}: {reason} (is it running? `make run` starts it)") from None
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the miner at {url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise _http_error(resp)
    try:
        data = resp.json()
    except ValueError:
        raise CliError(f"the miner at {url} answered 200 with a body that is not JSON: {resp.text[:80]!r}",
                       code=1) from None
    if args.full:
        print(json.dumps(data))
    return resp, data


def cmd_embed(args) -> int:
    resp, data = _call_signed(args, {"input": args.text if len(args.text) > 1 else args.text[0]})
    if args.full:
        return 0
    for item in data["data"]:
        vec = item["embedding"]
        head = ", ".join(f"{x:.4f}" for x in vec[:6])
        print(f"[{item['index']}] dim={len(vec)} [{head}, ...]")
    print(f"model={data['model']} usage={json.dumps(data['usage'])} request_id={resp.headers.get('x-request-id')}")
    return 0


def cmd_image(args) -> int:
    import base64

    payload = {"prompt": args.prompt, "n": args.n}
    for field in ("seed", "preset", "size", "steps", "negative_prompt"):
        if getattr(args, field) is not None:
            payload[field] = getattr(args, field)
    resp, data = _call_signed(args, payload)
    if args.full:
        return 0
    for i, item in enumerate(data["data"]):
        path = Path(f"{args.out}-{item['seed']}.png")
        path.write_bytes(base64.b64decode(item["b64_json"]))
        print(f"[{i}] seed={item['seed']} -> {path}")
    print(f"preset={data['preset']} steps={data['steps']} size={data['size']} "
          f"request_id={resp.headers.get('x-request-id')}")
    return 0


def cmd_agent(args) -> int:
    payload = {"task": args.task, "tools": args.tool or [], "documents": args.document or []}
    if args.max_steps is not None:
        payload["max_steps"] = args.max_steps
    shown = []

    def show(step: dict) -> None:
        outcome = f"error: {step['error']}" if "error" in step else f"-> {json.dumps(step['result'])}"
        print(f"[{len(shown)}] {step['tool']} {json.dumps(step['args'])} {outcome} ({step['ms']} ms)", flush=True)
        shown.append(step)

    if args.stream:  # each step printed as the miner sends it
        payload["stream"] = True
        resp, data = _call_signed(args, payload, on_event=lambda name, step: name == "step" and show(step))
    else:
        resp, data = _call_signed(args, payload)
        if args.full:
            return 0
        for step in data["steps"]:
            show(step)
    print(f"answer={json.dumps(data['answer'])} finish={data['finish']} usage={json.dumps(data['usage'])} "
          f"request_id={resp.headers.get('x-request-id')}")
    return 0


def cmd_config_check(args) -> int:
    from serve_app.app import check_config_file

    path, base = resolve_config(args.file)
    for cfg in check_config_file(path, base):
        subnets = ", ".join(f"{s.netuid} ({s.metagraph.source})" for s in cfg.subnets)
        print(f"{path}: ok; miner hotkey {cfg.wallet.hotkey_ss58()}; subnets {subnets}")
    return 0


def cmd_status(args) -> int:
    import httpx

    from serve_app.observability import status

    try:
        urls = args.metrics or status.ray_metrics_urls()
    except (OSError, ValueError) as exc:
        raise CliError(f"no local Ray cluster found ({exc}); pass --metrics http://HOST:PORT/metrics") from None
    try:
        before, after = status.collect(urls, args.interval, warn=lambda msg: print(msg, file=sys.stderr))
    except httpx.HTTPError as exc:
        raise CliError(f"cannot read the miner's metrics at {', '.join(urls)}: {exc} "
                       f"(is the miner running? `make run` starts it)") from None
    rows, edge = status.table(before, after), status.edge_refusals(before, after)
    if args.json:
        print(status.as_json(rows, after, edge))
    else:
        print(status.render(rows, after, edge))
    return 0


def _report_line(line: str) -> None:
    print(line, flush=True)  # as each subnet is done: a write waits for finalization


def cmd_publish(args) -> int:
    import asyncio

    from serve_app.app import check_config_file
    from serve_app.chain import publish

    path, base = resolve_config(args.config)
    configs = check_config_file(path, base)
    try:
        port = publish.http_port(path)
    except ValueError as exc:
        raise CliError(f"{path}: {exc}", code=1) from None
    failed = []
    for cfg in configs:
        _report_line(f"{path}: miner hotkey {cfg.wallet.hotkey_ss58()}"
                     + (" (dry run: nothing is written)" if args.dry_run else ""))
        outcomes = asyncio.run(publish.run(cfg, port, dry_run=args.dry_run, report=lambda o: _report_line(o.line)))
        failed += [o for o in outcomes if o.code]
    if failed:
        # Every subnet was reported above; the error line repeats what did not go through.
        raise CliError("; ".join(o.line for o in failed), code=max(o.code for o in failed))
    return 0


def _rollouts(args) -> dict:
    """workload -> its rollout, from the running miner's /info (workloads without a canary have none)."""
    import httpx

    from serve_app.chain.publish import http_port

    path, _ = _config(args)
    url = (args.url or f"http://127.0.0.1:{http_port(path)}").rstrip("/") + "/info"
    try:
        resp = httpx.get(url, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the miner at {url}: {type(exc).__name__} (is it running? `make run` starts "
                       f"it)") from None
    if resp.status_code != 200:
        raise _http_error(resp)
    return {name: wl["rollout"] for name, wl in resp.json().get("workloads", {}).items() if "rollout" in wl}


def cmd_rollout_status(args) -> int:
    rollouts = _rollouts(args)
    if args.json:
        print(json.dumps(rollouts))
        return 0
    if not rollouts:
        print("no rollout: no workload of the running miner has a canary")
    for name, r in rollouts.items():
        print(f"{name}: {r['state']}, candidate serves {r['weight']:.0%} of validators, {r['comparisons']} "
              f"comparisons, {r['traffic_s']:g} s of traffic")
        print(f"  stable    {r['stable']['model']} (weights {r['stable']['weights_sha256']}), "
              f"served {r['served']['stable']}")
        print(f"  candidate {r['candidate']['model']} (weights {r['candidate']['weights_sha256']}), "
              f"served {r['served']['candidate']}")
        print(f"  {r['reason']}")
    return 0


def cmd_rollout_decide(args) -> int:
    """promote / rollback by hand, through the miner's RolloutCoordinator actor on the local Ray cluster."""
    _, cfg = _config(args)
    import ray

    from serve_app.router.rollouts import rollout_coordinator

    try:
        ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CliError(f"no Ray cluster at {args.address} ({type(exc).__name__}): is the miner running?") from None
    coordinator = rollout_coordinator(cfg.name, create=False)
    if coordinator is None:
        raise CliError(f"miner {cfg.name!r} runs no rollout: no workload in its config has a canary", code=1)
    action = "promote" if args.action == "promote" else "rollback"
    try:
        state = ray.get(coordinator.decide.remote(args.workload, action, f"{action} by the operator"), timeout=10)
    except ray.exceptions.RayTaskError as exc:
        raise CliError(str(exc.cause if isinstance(exc.cause, ValueError) else exc), code=1) from None
    print(f"{args.workload}: {state['state']} ({state['reason']}); the routers follow within a second")
    return 0


def _ledger(args):
    """(config, the ledger file opened read-only) for the economics commands."""
    from serve_app.app import with_absolute_paths
    from serve_app.economics.ledger import Clock, Ledger, LedgerError

    path, base = resolve_config(args.config)
    _, cfg = _config(args)
    cfg = with_absolute_paths(cfg, base)
    try:
        return cfg, Ledger(cfg.ledger.path, Clock.of(cfg.ledger), cfg.ledger.keep_days, readonly=True)
    except LedgerError as exc:
        raise CliError(str(exc), code=1) from None


def _throughput(items) -> dict[str, float]:
    out = {}
    for item in items or []:
        workload, sep, rate = item.partition("=")
        try:
            out[workload] = float(rate)
        except ValueError:
            raise CliError(f"--throughput {item!r}: give WORKLOAD=TASKS_PER_S, e.g. embeddings=120") from None
        if not sep or workload not in ("embeddings", "diffusion", "agents") or out[workload] <= 0:
            raise CliError(f"--throughput {item!r}: give WORKLOAD=TASKS_PER_S (embeddings, diffusion or agents, "
                           f"a rate above 0)")
    return out


def cmd_economics(args) -> int:
    from serve_app.economics import commands

    try:
        seconds = commands.window_seconds(args.window)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    throughput = _throughput(args.throughput)
    cfg, ledger = _ledger(args)
    if args.pick:
        if cfg.economics is None:
            raise CliError(f"{args.config}: --pick needs prices and rewards: add an economics: block", code=1)
        result = commands.pick(cfg, ledger, throughput, seconds)
        print(json.dumps(result) if args.json else commands.pick_text(result))
        return 0
    figs = ledger.window(cfg, seconds)
    if args.json:
        print(json.dumps({"window": args.window, "subnets": {str(n): f for n, f in figs.items()}}))
    else:
        print(commands.economics_text(figs, args.window))
    return 0


def cmd_ledger(args) -> int:
    from serve_app.economics import commands

    cfg, ledger = _ledger(args)
    data = commands.ledger_json(cfg, ledger, args.days)
    print(json.dumps(data) if args.json else
          commands.ledger_text(data, cfg.economics.currency if cfg.economics else None))
    return 0


def cmd_report(args) -> int:
    from serve_app.economics import commands
    from serve_app.economics.report import render_report

    try:
        commands.window_seconds(args.window)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    cfg, ledger = _ledger(args)
    try:
        hotkey = cfg.wallet.hotkey_ss58()
    except ValueError:
        hotkey = "-"
    html = render_report(commands.report_data(cfg, ledger, args.window, hotkey))
    out = Path(args.out)
    out.write_text(html)
    print(f"{out}: the report of {len(cfg.subnets)} subnet(s), {len(html) // 1024} KiB; open it in a browser")
    return 0


def cmd_simulate(args) -> int:
    import httpx

    from serve_app.app import with_absolute_paths
    from serve_app.chain.publish import http_port
    from serve_app.simulate import driver, scoring

    path, base = resolve_config(args.config)
    _, cfg = _config(args)
    cfg = with_absolute_paths(cfg, base)
    url = (args.url or f"http://127.0.0.1:{http_port(path)}").rstrip("/")
    if args.rate * args.seconds > MAX_SIMULATED:
        raise CliError(f"--rate {args.rate:g} for --seconds {args.seconds:g} is {args.rate * args.seconds:,.0f} requests: "
                       f"at most {MAX_SIMULATED:,} a run")
    try:
        subnet = driver.pick_subnet(cfg, args.netuid)
        sim = driver.prepare(cfg, subnet, url, args.validators, args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        httpx.get(url + "/health", timeout=5)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the miner at {url}: {type(exc).__name__} (is it running? `make run` starts "
                       f"it)") from None
    if not args.no_reference and "embeddings" in sim.payloads.paths:
        sim.payloads.reference = driver.reference_vectors(cfg, sim.payloads.texts)
    report = driver.simulate(sim, subnet.netuid, args.seconds, args.rate, args.profile, args.seed, target=args.target)
    print(json.dumps(report) if args.json else scoring.text(report))
    if args.record:
        from serve_app.economics.ledger import Clock, Ledger, LedgerError

        try:
            ledger = Ledger(cfg.ledger.path, Clock.of(cfg.ledger), cfg.ledger.keep_days)
            ledger.add_simulation(report["ledger_line"])
            ledger.close()
        except LedgerError as exc:
            raise CliError(str(exc), code=1) from None
    return 0 if report["verdict"]["holds"] else 1


def _bounded(low: float, high: float, what: str, low_open: bool = True):
    """An argparse type: a finite number in (low, high] (or [low, high])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"{text!r}: {what} ({'over' if low_open else 'at least'} {low:g}, "
                                             f"at most {high:g})")
        return value
    return parse


def _validator_options(cmd: argparse.ArgumentParser, path: str) -> None:
    cmd.add_argument("--url", default="http://127.0.0.1:8000")
    cmd.add_argument("--path", default=path)
    cmd.add_argument("--key", default="//Alice", help="dev key URI to sign with (default //Alice)")
    cmd.add_argument("--wallet-name", help="sign with this wallet's hotkey instead of a dev key")
    cmd.add_argument("--wallet-hotkey", default="default")
    cmd.add_argument("--wallet-path", default="~/.bittensor/wallets")
    cmd.add_argument("--miner-hotkey", help="receiver ss58 (default: the hotkey in --config)")
    cmd.add_argument("--config", default=DEFAULT_CONFIG,
                     help="serve config to read the miner hotkey and the route's auth.scheme from")
    cmd.add_argument("--scheme", choices=("btauth", "epistula"),
                     help="sign with btauth/1 or Epistula v2 (default: the scheme of the subnet serving --path)")
    cmd.add_argument("--timeout", type=float, default=30.0)
    cmd.add_argument("--full", action="store_true", help="print the whole JSON response")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrank-miner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    validator = sub.add_parser("validator", help="act as a validator against a running miner")
    vsub = validator.add_subparsers(dest="action", required=True)
    embed = vsub.add_parser("embed", help="request embeddings, signed with the subnet's scheme")
    embed.add_argument("text", nargs="+", help="one or more texts")
    _validator_options(embed, "/v1/embeddings")
    embed.set_defaults(func=cmd_embed)
    image = vsub.add_parser("image", help="request text-to-image, signed with the subnet's scheme; PNGs written to files")
    image.add_argument("prompt")
    image.add_argument("--n", type=int, default=1)
    image.add_argument("--seed", type=int)
    image.add_argument("--preset")
    image.add_argument("--size", help="WIDTHxHEIGHT")
    image.add_argument("--steps", type=int)
    image.add_argument("--negative-prompt")
    image.add_argument("--out", default="image", help="file name stem: files are <stem>-<seed>.png")
    _validator_options(image, "/v1/images/generations")
    image.set_defaults(func=cmd_image)
    agent = vsub.add_parser("agent", help="request an agent run, signed with the subnet's scheme")
    agent.add_argument("task")
    agent.add_argument("--tool", action="append", help="a tool the agent may call (repeatable)")
    agent.add_argument("--document", action="append", help="a text for the retrieve tool (repeatable)")
    agent.add_argument("--max-steps", type=int)
    agent.add_argument("--stream", action="store_true", help="ask for Server-Sent Events: each step as it ends")
    _validator_options(agent, "/v1/agents/runs")
    agent.set_defaults(func=cmd_agent)

    config = sub.add_parser("config", help="miner config tools")
    csub = config.add_subparsers(dest="action", required=True)
    check = csub.add_parser("check", help="validate a serve config file's miner args")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    check.set_defaults(func=cmd_config_check)

    stat = sub.add_parser("status", help="per-subnet req/s, p50/p95/p99, error budget left and queue depth")
    stat.add_argument("--metrics", action="append",
                      help="a Ray metrics endpoint (repeatable; default: the local cluster's, from Ray's discovery file)")
    stat.add_argument("--interval", type=float, default=10.0,
                      help="seconds between the two reads (Ray exports metrics every 10 s by default)")
    stat.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stat.set_defaults(func=cmd_status)

    pub = sub.add_parser("publish", help="publish each subnet's endpoint (subnets[].endpoint) as the miner hotkey's "
                                         "axon, only where the chain holds another; signs with the wallet's hotkey")
    pub.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    pub.add_argument("--dry-run", action="store_true",
                     help="compare and print the plan; never loads the hotkey's secret nor writes")
    pub.set_defaults(func=cmd_publish)

    roll = sub.add_parser("rollout", help="a workload's candidate model (workloads.<name>.canary) in the running miner")
    rsub = roll.add_subparsers(dest="action", required=True)
    rstat = rsub.add_parser("status", help="each rollout's state, weight, comparisons and reason (from /info)")
    rstat.add_argument("--json", action="store_true", help="print JSON: {workload: {state, weight, ...}}")
    rstat.add_argument("--url", help="the miner (default: 127.0.0.1 at the config's http_options.port)")
    rstat.add_argument("--timeout", type=float, default=10.0)
    rstat.set_defaults(func=cmd_rollout_status)
    rstat.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    for action, help in (("promote", "make the candidate stable now"),
                         ("rollback", "send every validator back to stable now")):
        cmd = rsub.add_parser(action, help=f"{help} (through the local Ray cluster)")
        cmd.add_argument("--workload", required=True, choices=("embeddings", "diffusion", "agents"))
        cmd.add_argument("--address", default="auto", help="the Ray cluster (default: the local one)")
        cmd.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
        cmd.set_defaults(func=cmd_rollout_decide)

    econ = sub.add_parser("economics", help="per subnet over a window: tasks, revenue, cost, profit, unit cost "
                                            "(from the ledger)")
    econ.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    econ.add_argument("--window", default="24h", help="1h, 24h, 7d, 30d... (ledger time)")
    econ.add_argument("--json", action="store_true", help='print JSON: {"subnets": {"<netuid>": {...}}}')
    econ.add_argument("--pick", action="store_true",
                      help="rank the served and candidate subnets (economics.candidates) by expected profit an hour")
    econ.add_argument("--throughput", action="append", metavar="WORKLOAD=TASKS_PER_S",
                      help="--pick: a workload's measured throughput (a benchmark's), instead of the ledger's busiest "
                           "minute (repeatable)")
    econ.set_defaults(func=cmd_economics)

    led = sub.add_parser("ledger", help="each subnet's days (SLOs, requests, refusals, money, versions) and its "
                                        "verdict: hold, stable or expand")
    led.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    led.add_argument("--json", action="store_true")
    led.add_argument("--days", type=int, help="only the last DAYS days (the verdict still judges all)")
    led.set_defaults(func=cmd_ledger)

    from serve_app.simulate.arrivals import PROFILES

    sim = sub.add_parser("simulate", help="simulated validators against a running miner: each one's score, its "
                                          "breakdown, and whether the miner would hold its score at this load")
    sim.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    sim.add_argument("--url", help="the miner (default: 127.0.0.1 at the config's http_options.port)")
    sim.add_argument("--netuid", type=int, help="the subnet to simulate (default: the config's first)")
    sim.add_argument("--seconds", type=_bounded(0, 86400, "seconds of run"), default=60.0)
    sim.add_argument("--rate", type=_bounded(0, 10000, "arrivals a second"), default=4.0,
                     help="mean arrivals a second, all validators together")
    sim.add_argument("--profile", choices=PROFILES, default="steady",
                     help="steady Poisson, bursts at 3x, or a diurnal curve compressed into the run")
    sim.add_argument("--validators", type=Path,
                     help="a YAML/JSON file of validators (keys held here) instead of the snapshot's dev keys")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--target", type=_bounded(0, 1, "a score"), default=0.99,
                     help="the stake-weighted score the verdict asks for")
    sim.add_argument("--no-reference", action="store_true",
                     help="do not load the embeddings model here: check vectors' shapes only")
    sim.add_argument("--record", action="store_true", help="append the run's line to the config's ledger")
    sim.add_argument("--json", action="store_true", help='print JSON: {"validators": [...], "verdict": {...}}')
    sim.set_defaults(func=cmd_simulate)

    rep = sub.add_parser("report", help="the operator's report: one self-contained HTML file with charts")
    rep.add_argument("--config", default=DEFAULT_CONFIG, help="serve config (default deployments/local.yaml)")
    rep.add_argument("--out", default="report.html")
    rep.add_argument("--window", default="24h", help="the window of its economics table")
    rep.set_defaults(func=cmd_report)
    return p


def _explain(exc: Exception, args) -> tuple[list[str], int]:
    """The lines to print and the exit code for an error a command raised."""
    if isinstance(exc, CliError):
        return [str(exc)], exc.code
    app = sys.modules.get("serve_app.app")  # imported (it imports Ray Serve) only to read a config
    if app is not None and isinstance(exc, app.ConfigError):
        return exc.lines(), 2 if exc.unreadable else 1
    if isinstance(exc, OSError):  # e.g. `validator image --out` into a directory that does not exist
        return [f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)], 2
    # An answer of a shape the command did not expect, or a bug.
    what = f"the answer has no field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return [f"{command} failed: {what} (TORCHRANK_DEBUG=1 for the traceback)"], 1


def main(argv=None) -> int:
    """Every error a command meets ends here: one line on stderr (a config: one per problem), a
    non-zero exit, no traceback (TORCHRANK_DEBUG=1 shows the traceback of an unexpected one)."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("TORCHRANK_DEBUG") and not isinstance(exc, CliError):
            raise
        lines, code = _explain(exc, args)
    for line in lines:
        print(f"torchrank-miner: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
