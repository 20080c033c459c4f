"""The miner guide's arithmetic (serve_app/economics/money.py) and the subnet picker, on
hand-made figures whose results are worked out in the comments."""

from pathlib import Path

import pytest

from serve_app.config import MinerConfig
from serve_app.economics import commands
from serve_app.economics.money import Held, Usage, figures, guide, held_cost

SNAPSHOT = {"source": "snapshot", "path": "deployments/local-metagraph.json"}
EMBED = [{"path": "/v1/embeddings", "protocol": "openai-embeddings"}]


def config(economics=None, **over):
    args = {"wallet": {"uri": "//Bob"},
            "subnets": [{"netuid": 1, "metagraph": SNAPSHOT, "routes": EMBED,
                         "reward": {"per_task_tao": 0.001}},
                        {"netuid": 2, "prefix": "/sn2", "metagraph": SNAPSHOT, "reward": {"source": "chain"},
                         "routes": EMBED + [{"path": "/v1/images/generations", "protocol": "openai-images"}]}],
            "economics": economics if economics is not None else {
                "currency": "USD", "tao_price": 200, "prices": {"cpu_per_hour": 0.5, "gpu_per_hour": 2.0},
                "ops_per_month": 73, "egress_per_gb": 0.1},
            "workloads": {"embeddings": {}, "diffusion": {}}, "router": {"max_in_progress": 2048}}
    args.update(over)
    return MinerConfig.model_validate(args)


def test_the_guides_three_formulas():
    # rev = 1000 x 0.9 x 0.02 = 18; unit_cost = 6 / 1000; profit = 18 - 0.006 x 1000 = 12
    assert guide(1000, 0.9, 0.02, 6.0) == pytest.approx({"revenue": 18.0, "unit_cost": 0.006, "profit": 12.0})
    # No tasks: no unit cost, and the cost is all loss.
    assert guide(0, 0.0, 0.02, 6.0) == {"revenue": 0.0, "unit_cost": None, "profit": -6.0}


def test_held_cost_includes_power():
    cfg = config(economics={"tao_price": 1, "prices": {"cpu_per_hour": 0.5, "gpu_per_hour": 2.0,
                                                        "cpu_watts": 10, "gpu_watts": 300},
                            "power_per_kwh": 0.2})
    # 4 CPU-h x 0.5 + 1 GPU-h x 2 = 4; power (4 x 10 + 1 x 300) W-h = 0.34 kWh x 0.2 = 0.068
    assert held_cost(cfg.economics.prices, 0.2, 4, 1) == pytest.approx(4.068)


def test_costs_are_split_by_task_share_and_revenue_follows_each_reward():
    cfg = config()
    usage = {(1, "embeddings"): Usage(requests=900, admitted=800, answered=790, accepted=760, late=30, failed=10,
                                      miner_failures=5, egress_bytes=2_000_000_000),
             (2, "embeddings"): Usage(requests=200, admitted=200, answered=200, accepted=200)}
    held = {"embeddings": Held(cpu_hours=2.0), "diffusion": Held(gpu_hours=1.0), "router": Held(cpu_hours=1.0)}
    figs = figures(cfg, usage, held, chain_tao={2: 0.05}, hours=10)
    one, two = figs[1], figs[2]
    # Embeddings cost 2 x 0.5 = 1.0: subnet 1 has 800 of its 1000 tasks -> 0.8; the router's 0.5 too -> 0.4.
    # Diffusion (1 GPU-h x 2 = 2.0, no tasks) is subnet 2's alone: only it routes there.
    # Ops: 73 / 730 x 10 h = 1.0, half each. Egress: 2 GB x 0.1 = 0.2, subnet 1's.
    assert one["cost"] == pytest.approx(0.8 + 0.4 + 0.5 + 0.2)
    assert two["cost"] == pytest.approx(0.2 + 2.0 + 0.1 + 0.5)
    # Fixed: 800 x (760/800) x 0.001 TAO x 200 = 152; chain: 0.05 TAO x 200 = 10, whatever the tasks.
    assert one["acceptance_rate"] == pytest.approx(0.95)
    assert one["revenue"] == pytest.approx(152.0)
    assert one["profit"] == pytest.approx(152.0 - 1.9)
    assert one["unit_cost"] == pytest.approx(1.9 / 800)
    assert one["cost_per_1k_tasks"] == pytest.approx(1000 * 1.9 / 800)
    assert two["revenue"] == pytest.approx(10.0) and two["profit"] == pytest.approx(10.0 - 2.8)
    assert two["reward_per_task"] == pytest.approx(10.0 / 200)
    assert one["resource_hours"]["embeddings"] == pytest.approx({"cpu": 1.6, "gpu": 0.0, "share": 0.8})
    assert "diffusion" not in one["resource_hours"]


def test_without_prices_the_counts_stay_and_money_is_none():
    cfg = config().model_copy(update={"economics": None})
    figs = figures(cfg, {(1, "embeddings"): Usage(admitted=3, accepted=3, answered=3)}, {}, {}, 1.0)
    assert figs[1]["tasks"] == 3 and figs[1]["revenue"] is None and figs[1]["profit"] is None


@pytest.mark.parametrize("text, seconds", [("1h", 3600), ("24h", 86400), ("7d", 604800), ("90m", 5400),
                                           ("0.5d", 43200)])
def test_windows(text, seconds):
    assert commands.window_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0h", "3w"])
def test_bad_windows_are_named(text):
    with pytest.raises(ValueError, match="1h, 24h, 7d"):
        commands.window_seconds(text)


def picker_config(**economics):
    # One CPU workload and one GPU one; the default placements (1 replica, 1 CPU).
    return config(economics={
        "tao_price": 100, "prices": {"cpu_per_hour": 0.1}, "workloads": {"diffusion": {"gpu_per_hour": 1.0}},
        "candidates": [{"netuid": 7, "name": "cheap", "workload": "embeddings", "reward": {"per_task_tao": 0.0001},
                        "tasks_per_hour": 100, "acceptance": 1.0},
                       {"netuid": 8, "name": "rich", "workload": "embeddings", "reward": {"per_task_tao": 0.0001},
                        "tasks_per_hour": 10_000, "acceptance": 1.0}],
        **economics},
        subnets=[{"netuid": 1, "metagraph": SNAPSHOT, "routes": EMBED, "reward": {"per_task_tao": 0.0001}}])


def test_pick_ranks_by_expected_profit_and_caps_demand_at_capacity():
    result = commands.pick(picker_config(), None, {"embeddings": 1.0}, 3600)  # 3,600 tasks an hour at most
    # The served subnet with no ledger: as many tasks as it answers, at the default acceptance of 0.95.
    assert [r["name"] for r in result["ranking"]] == ["rich", "subnet 1", "cheap"]
    rich, served, cheap = result["ranking"]
    assert served["revenue_per_hour"] == pytest.approx(3600 * 0.95 * 0.0001 * 100)
    # rich: min(10,000, 3,600) x 1.0 x 0.0001 TAO x 100 = 36/h; cost: embeddings 1 CPU x 0.1 + router 0.5 x 0.1.
    assert rich["tasks_per_hour"] == 3600 and rich["revenue_per_hour"] == pytest.approx(36.0)
    assert rich["profit_per_hour"] == pytest.approx(36.0 - 0.15)
    assert cheap["profit_per_hour"] == pytest.approx(1.0 - 0.15)
    # What would change it: cheap overtakes subnet 1 (34.2 - 0.15 an hour) with a reward above
    # 0.0001 + (34.2 - 1.0) / (100 tasks x 1.0 x 100) = 0.00342 TAO, or 3,420 tasks an hour.
    assert any("0.00342000 TAO per task" in change for change in cheap["to_overtake"])
    assert any("3,420 tasks an hour" in change for change in cheap["to_overtake"])
    assert "rich" in commands.pick_text(result)


def test_candidates_on_a_workload_this_hardware_lacks_are_left_out():
    cfg = picker_config(candidates=[{"netuid": 9, "workload": "diffusion", "tasks_per_hour": 10}])
    cfg = cfg.model_copy(update={"workloads": cfg.workloads.model_copy(update={"diffusion": None})})
    assert [r["netuid"] for r in commands.pick(cfg, None, {}, 3600)["ranking"]] == [1]


def test_the_commands_say_what_is_wrong_in_one_line(tmp_path, capsys):
    from serve_app import cli

    config = tmp_path / "serve.yaml"
    config.write_text(Path("deployments/local.yaml").read_text().replace(
        "~/.local/state/torchrank-miner/ledger.sqlite", str(tmp_path / "none.sqlite")))
    assert cli.main(["economics", "--config", str(config)]) == 1
    assert "no ledger at" in capsys.readouterr().err
    assert cli.main(["economics", "--config", str(config), "--window", "3w"]) == 2
    assert "--window '3w': give a number and a unit" in capsys.readouterr().err
    assert cli.main(["economics", "--config", str(config), "--pick", "--throughput", "embeddings"]) == 2
    assert "WORKLOAD=TASKS_PER_S" in capsys.readouterr().err
    assert cli.main(["ledger", "--config", str(config)]) == 1 and "no ledger at" in capsys.readouterr().err


def test_a_workload_no_route_uses_is_paid_like_the_router_and_old_subnets_pay_nothing():
    cfg = config()
    usage = {(1, "embeddings"): Usage(admitted=30), (2, "embeddings"): Usage(admitted=10),
             (9, "embeddings"): Usage(admitted=1000)}  # subnet 9 is no longer in the config
    # Agents held a CPU for an hour though no subnet routes to it: 0.5, split by all tasks 3:1.
    figs = figures(cfg, usage, {"agents": Held(cpu_hours=1.0), "embeddings": Held(cpu_hours=1.0)}, {}, 0.0)
    assert figs[1]["resource_hours"]["agents"]["share"] == pytest.approx(0.75)
    assert figs[1]["resource_hours"]["embeddings"]["share"] == pytest.approx(0.75)
    assert figs[1]["cost"] + figs[2]["cost"] == pytest.approx(1.0)
    assert figs[1]["workloads"]["embeddings"] == {"tasks": 30, "accepted": 0, "cost": pytest.approx(0.375)}


def test_what_the_keeper_counts_as_held():
    from serve_app.economics.keeper import held_now, shares

    cfg = config(workloads={"embeddings": {"placement": {"num_cpus": 0.5},
                                           "canary": {"model": "/m", "placement": {"num_cpus": 0.25}}},
                            "diffusion": {"placement": {"num_cpus": 1, "num_gpus": 0.5}}})
    assert shares(cfg)["EmbeddingsCandidate"] == ("embeddings", 0.25, 0.0)
    held, up = held_now({"Router": 2, "Embeddings": 1, "EmbeddingsCandidate": 2, "Diffusion": 2}, cfg)
    assert held["router"] == (1.0, 0.0, 2) and held["embeddings"] == (1.0, 0.0, 3)
    assert held["diffusion"] == (2.0, 1.0, 2) and up
    held, up = held_now({"Router": 1, "Embeddings": 1, "Diffusion": 0}, cfg)
    assert not up  # a workload with no RUNNING replica: the miner cannot serve all its routes
    held, up = held_now(None, cfg)  # no application: nothing held, down
    assert not up and all(h == (0.0, 0.0, 0) for h in held.values())
