"""On the chain, end to end: Epistula v2 beside btauth/1 on two subnets of the session's miner,
and the miner's own standing (from its metagraph snapshots) in /info and its metrics."""

import hashlib
import time
import uuid

import httpx
from bittensor.sp_core import Keypair

from serve_app.chain.standing import epochs_per_day
from tests.conftest import BOB_STANDING, EPISTULA_NETUID, EPISTULA_PREFIX, MINER, wait_until

ALICE = Keypair.create_from_uri("//Alice")
ROUTE = EPISTULA_PREFIX + "/v1/embeddings"


def epistula_post(miner, payload_text, key=ALICE, path=ROUTE, signed_for=MINER):
    """Signed as the spec says (not with the miner's own client): (response, headers, body)."""
    body = ('{"input": "%s"}' % payload_text).encode()
    timestamp, request_id = str(round(time.time() * 1000)), str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{request_id}.{timestamp}.{signed_for}"
    headers = {"Epistula-Version": "2", "Epistula-Timestamp": timestamp, "Epistula-Uuid": request_id,
               "Epistula-Signed-By": key.ss58_address, "Epistula-Signed-For": signed_for,
               "Epistula-Request-Signature": "0x" + bytes(key.sign(message.encode())).hex(),
               "Content-Type": "application/json"}
    return miner.http.post(path, content=body, headers=headers), headers, body


def refusal(resp):
    return resp.status_code, resp.json()["error"]


def test_epistula_subnet_answers_epistula_and_refuses_btauth(miner):
    resp, headers, body = epistula_post(miner, "signed the epistula way")
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"][0]["embedding"]) == 384
    # Replayed, to the same route (it may land on the other router replica) or to subnet 1's:
    assert refusal(miner.http.post(ROUTE, content=body, headers=headers)) == (401, "replayed_request")
    # subnet 1 speaks btauth/1 only.
    assert refusal(miner.http.post("/v1/embeddings", content=body, headers=headers)) == (401, "malformed_auth")
    # And the Epistula subnet refuses btauth/1 headers.
    assert refusal(miner.post({"input": "btauth here"}, path=ROUTE)) == (401, "malformed_auth")
    # The btauth subnet still answers btauth, the Epistula subnet the miner's own Epistula client.
    assert miner.post({"input": "btauth there"}).status_code == 200
    assert miner.post({"input": "own client"}, path=ROUTE, scheme="epistula").status_code == 200


def test_epistula_refusals_are_the_same_as_btauths(miner):
    resp, headers, body = epistula_post(miner, "tampered")
    assert resp.status_code == 200
    headers["Epistula-Uuid"] = str(uuid.uuid4())  # not what was signed
    assert refusal(miner.http.post(ROUTE, content=body, headers=headers)) == (401, "bad_signature")
    assert refusal(epistula_post(miner, "x", signed_for=Keypair.create_from_uri("//Charlie").ss58_address)[0]) \
        == (401, "wrong_receiver")
    stale = dict(epistula_post(miner, "fresh")[1], **{"Epistula-Timestamp": str(round(time.time() * 1000) - 60_000)})
    assert refusal(miner.http.post(ROUTE, content=b'{"input": "fresh"}', headers=stale)) == (401, "stale_request")
    # Authorisation after authentication is the subnet's, whatever the scheme.
    assert refusal(epistula_post(miner, "x", key=Keypair.create_from_uri("//Charlie"))[0]) == (403, "no_validator_permit")
    assert refusal(epistula_post(miner, "x", key=Keypair.create_from_uri("//Dave"))[0]) == (403, "not_registered")
    assert refusal(epistula_post(miner, "x", key=Keypair.create_from_uri("//Poor"))[0]) == (403, "insufficient_stake")
    assert refusal(epistula_post(miner, "x", key=Keypair.create_from_uri("//Denied"))[0]) == (403, "denied")
    assert miner.http.post(ROUTE, json={"input": "unsigned"}).status_code == 401


def test_info_shows_the_miners_standing_and_axon(miner):
    subnets = {s["netuid"]: s for s in miner.http.get("/info").json()["subnets"]}
    port = int(miner.url.rsplit(":", 1)[1])
    own = subnets[1]["standing"]
    assert own["uid"] == 1 and own["incentive"] == BOB_STANDING["incentive"]
    assert own["emission_alpha"] == BOB_STANDING["emission"] and own["emission_tao"] == BOB_STANDING["emission"] * 0.5
    assert abs(own["tao_per_day"] - BOB_STANDING["emission"] * 0.5 * epochs_per_day(99)) < 1e-3
    assert own["immunity_blocks_left"] == 0 and own["free_uids"] == 0
    assert own["pruning_position"] == own["pruning_candidates"] == 5  # the others have pruning score 0
    assert subnets[1]["axon"] == {"endpoint": f"127.0.0.1:{port}", "on_chain": f"127.0.0.1:{port}", "matches": True}
    assert subnets[EPISTULA_NETUID]["axon"] == {"endpoint": f"127.0.0.1:{port}", "on_chain": "10.0.0.9:8091",
                                                "matches": False}


def test_standing_metrics_are_exported(miner):
    def gauges():
        text = httpx.get(miner.metrics_url, timeout=10).text
        found = {}
        for line in text.splitlines():
            for name in ("ray_torchrank_axon_matches", "ray_torchrank_own_registered", "ray_torchrank_own_incentive",
                         "ray_torchrank_own_tao_per_day", "ray_torchrank_own_pruning_position"):
                if line.startswith(name + "{"):
                    netuid = line.split('netuid="')[1].split('"')[0]
                    found[(name, netuid)] = float(line.rsplit(" ", 1)[1])
        return found

    want = {("ray_torchrank_axon_matches", "1"): 1.0, ("ray_torchrank_axon_matches", str(EPISTULA_NETUID)): 0.0,
            ("ray_torchrank_own_registered", "1"): 1.0, ("ray_torchrank_own_incentive", "1"): 0.25,
            ("ray_torchrank_own_pruning_position", "1"): 5.0}
    wait_until(lambda: want.items() <= gauges().items(), 30, lambda: f"standing gauges: {gauges()}")
    assert gauges()[("ray_torchrank_own_tao_per_day", "1")] > 0
