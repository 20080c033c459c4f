import pytest

from serve_app.chain.metagraph import MetagraphView, Neuron
from serve_app.config import AuthPolicy
from serve_app.errors import ApiError
from serve_app.router.policy import authorise

VIEW = MetagraphView(
    netuid=7,
    block=1,
    neurons={
        "val": Neuron(0, "val", 5000.0, True),
        "poor": Neuron(1, "poor", 5.0, True),
        "miner": Neuron(2, "miner", 100.0, False),
    },
)


def code(hotkey, policy, view=VIEW):
    try:
        authorise(hotkey, view, policy)
    except ApiError as err:
        return err.status, err.code
    return 200, "ok"


def test_validator_with_permit_and_stake_is_admitted():
    assert code("val", AuthPolicy(min_stake=1000)) == (200, "ok")


@pytest.mark.parametrize(
    "hotkey, policy, expected",
    [
        ("stranger", AuthPolicy(), (403, "not_registered")),
        ("miner", AuthPolicy(), (403, "no_validator_permit")),
        ("poor", AuthPolicy(min_stake=10), (403, "insufficient_stake")),
        ("val", AuthPolicy(deny_hotkeys=("val",)), (403, "denied")),
    ],
)
def test_refusals(hotkey, policy, expected):
    assert code(hotkey, policy) == expected


def test_permit_requirement_is_configurable():
    assert code("miner", AuthPolicy(require_validator_permit=False)) == (200, "ok")
    assert code("miner", AuthPolicy(require_validator_permit=False, min_stake=1000)) == (403, "insufficient_stake")


def test_allow_list_overrides_registration_but_not_the_deny_list():
    assert code("stranger", AuthPolicy(allow_hotkeys=("stranger",))) == (200, "ok")
    assert code("stranger", AuthPolicy(allow_hotkeys=("stranger",)), view=None) == (200, "ok")
    with pytest.raises(ValueError, match="both allowed and denied"):
        AuthPolicy(allow_hotkeys=("x",), deny_hotkeys=("x",))


def test_no_metagraph_yet_is_503_not_a_free_pass():
    assert code("val", AuthPolicy(), view=None) == (503, "unavailable")


def test_a_view_past_its_max_age_admits_only_the_allow_list():
    import dataclasses
    import time

    stale = dataclasses.replace(VIEW, fetched_at=time.time() - 601, max_age_s=600)
    try:
        authorise("val", stale, AuthPolicy())
    except ApiError as err:
        assert (err.status, err.code) == (503, "unavailable")
        assert "max_age_s (600s)" in err.detail and "allow-listed" in err.detail
    else:
        raise AssertionError("a deregistered validator would keep access through the outage")
    assert code("ops", AuthPolicy(allow_hotkeys=("ops",)), view=stale) == (200, "ok")
    assert code("val", AuthPolicy(), view=dataclasses.replace(stale, fetched_at=time.time())) == (200, "ok")
