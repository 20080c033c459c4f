"""`torchrank-miner`: the operator's command.

  torchrank-miner validator embed "some text"     sign as //Alice, call the miner, print the result
  torchrank-miner validator image "a prompt"      the same for text-to-image; PNGs written to files
  torchrank-miner validator agent "a task"        the same for an agent run; prints its steps
  torchrank-miner config check deployments/x.yaml validate a serve config's miner args
  torchrank-miner status                          per-subnet req/s, latency, error budget, queues
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = "deployments/local.yaml"


def _miner_hotkey(args) -> str:
    if args.miner_hotkey:
        return args.miner_hotkey
    from serve_app.app import load_config

    return load_config(args.config).wallet.hotkey_ss58()


def _call_signed(args, payload: dict):
    """(exit code, response, its JSON) for one signed POST to args.path; prints why on failure."""
    import httpx

    from serve_app.client import signed_request, signer_for

    signer = signer_for(args.key, args.wallet_name, args.wallet_hotkey, args.wallet_path)
    body, headers = signed_request(signer, args.path, payload, _miner_hotkey(args))
    try:
        resp = httpx.post(args.url.rstrip("/") + args.path, content=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"cannot reach the miner at {args.url}: {exc}", file=sys.stderr)
        return 2, None, None
    data = resp.json()
    if resp.status_code != 200:
        print(f"HTTP {resp.status_code}: {json.dumps(data)}", file=sys.stderr)
        return 1, resp, data
    if args.full:
        print(json.dumps(data))
    return 0, resp, data


def cmd_embed(args) -> int:
    code, resp, data = _call_signed(args, {"input": args.text if len(args.text) > 1 else args.text[0]})
    if code or args.full:
        return code
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
    code, resp, data = _call_signed(args, payload)
    if code or args.full:
        return code
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
    code, resp, data = _call_signed(args, payload)
    if code or args.full:
        return code
    for i, step in enumerate(data["steps"]):
        outcome = f"error: {step['error']}" if "error" in step else f"-> {json.dumps(step['result'])}"
        print(f"[{i}] {step['tool']} {json.dumps(step['args'])} {outcome} ({step['ms']} ms)")
    print(f"answer={json.dumps(data['answer'])} finish={data['finish']} usage={json.dumps(data['usage'])} "
          f"request_id={resp.headers.get('x-request-id')}")
    return 0


def cmd_config_check(args) -> int:
    from pydantic import ValidationError

    from serve_app.app import check_startable, load_config, with_absolute_paths

    try:
        cfg = with_absolute_paths(load_config(args.file))
        check_startable(cfg)
    except (ValidationError, ValueError) as exc:
        print(f"{args.file}: invalid miner config:\n{exc}", file=sys.stderr)
        return 1
    subnets = ", ".join(f"{s.netuid} ({s.metagraph.source})" for s in cfg.subnets)
    print(f"{args.file}: ok; miner hotkey {cfg.wallet.hotkey_ss58()}; subnets {subnets}")
    return 0


def cmd_status(args) -> int:
    import httpx

    from serve_app.observability import status

    try:
        urls = args.metrics or status.ray_metrics_urls()
    except (OSError, ValueError) as exc:
        print(f"no local Ray cluster found ({exc}); pass --metrics http://HOST:PORT/metrics", file=sys.stderr)
        return 2
    try:
        before, after = status.collect(urls, args.interval, warn=lambda msg: print(msg, file=sys.stderr))
    except httpx.HTTPError as exc:
        print(f"cannot read the miner's metrics at {urls}: {exc}", file=sys.stderr)
        return 2
    rows = status.table(before, after)
    if args.json:
        print(status.as_json(rows, after))
    else:
        print(status.render(rows, after))
    return 0


def _validator_options(cmd: argparse.ArgumentParser, path: str) -> None:
    cmd.add_argument("--url", default="http://127.0.0.1:8000")
    cmd.add_argument("--path", default=path)
    cmd.add_argument("--key", default="//Alice", help="dev key URI to sign with (default //Alice)")
    cmd.add_argument("--wallet-name", help="sign with this wallet's hotkey instead of a dev key")
    cmd.add_argument("--wallet-hotkey", default="default")
    cmd.add_argument("--wallet-path", default="~/.bittensor/wallets")
    cmd.add_argument("--miner-hotkey", help="receiver ss58 (default: the hotkey in --config)")
    cmd.add_argument("--config", default=DEFAULT_CONFIG, help="serve config to read the miner hotkey from")
    cmd.add_argument("--timeout", type=float, default=30.0)
    cmd.add_argument("--full", action="store_true", help="print the whole JSON response")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrank-miner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    validator = sub.add_parser("validator", help="act as a validator against a running miner")
    vsub = validator.add_subparsers(dest="action", required=True)
    embed = vsub.add_parser("embed", help="request embeddings, signed with btauth/1")
    embed.add_argument("text", nargs="+", help="one or more texts")
    _validator_options(embed, "/v1/embeddings")
    embed.set_defaults(func=cmd_embed)
    image = vsub.add_parser("image", help="request text-to-image, signed with btauth/1; PNGs written to files")
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
    agent = vsub.add_parser("agent", help="request an agent run, signed with btauth/1")
    agent.add_argument("task")
    agent.add_argument("--tool", action="append", help="a tool the agent may call (repeatable)")
    agent.add_argument("--document", action="append", help="a text for the retrieve tool (repeatable)")
    agent.add_argument("--max-steps", type=int)
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
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
