import pytest

from serve_app.config import AgentsConfig
from serve_app.errors import ApiError
from serve_app.protocols.agents import AgentRuns


def test_available_tools_follow_the_config():
    cfg = AgentsConfig()
    assert cfg.tools.offered(embeddings=True) == ["calculator", "scratchpad", "retrieve"]
    assert cfg.tools.offered(embeddings=False) == ["calculator", "scratchpad"]
    fetch_on = AgentsConfig(tools={"http_fetch": {"enabled": True, "allowed_hosts": ["docs.example.org"]}})
    assert "http_fetch" in fetch_on.tools.offered(embeddings=False)
    # Enabled with no host allowed is still off: it could fetch nothing.
    assert "http_fetch" not in AgentsConfig(tools={"http_fetch": {"enabled": True}}).tools.offered(False)


def test_defaults_and_dedup():
    req = AgentRuns(AgentsConfig(), embeddings=True).parse(b'{"task": "t", "tools": ["calculator", "calculator"]}')
    assert req.max_steps == AgentsConfig().limits.default_max_steps and req.tools == ["calculator"]


@pytest.mark.parametrize("body, field", [
    (b'{"task": "t", "tools": ["retrieve"]}', "tools"),  # no embeddings workload
    (b'{"task": "t", "max_steps": 17}', "max_steps"),
    (b'{"task": ""}', "task"),
])
def test_limits(body, field):
    with pytest.raises(ApiError) as err:
        AgentRuns(AgentsConfig(), embeddings=False).parse(body)
    assert err.value.status == 422 and err.value.detail.startswith(field)


def test_default_steps_within_the_limit():
    with pytest.raises(ValueError, match="default_max_steps"):
        AgentsConfig(limits={"default_max_steps": 20, "max_steps": 10})
