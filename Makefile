# The two commands of the README: `make run` and `make test`. Everything they need is
# installed here, so a fresh clone on a fresh machine works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU wheel by default. On a GPU host: make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: setup run test test-unit test-cluster bench prometheus clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Debian's prometheus: promtool for the rule tests, the server for the scrape test.
	@# Debian's chromium: the headless browser that loads the report and the public page in the tests.
	missing="$$(command -v promtool >/dev/null && command -v prometheus >/dev/null || echo prometheus) \
	  $$(command -v chromium >/dev/null || echo chromium)"; \
	test -z "$$(echo $$missing)" || \
	  { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
	    $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# serve run under deployments/ray.env (HAProxy ingress, Serve's throughput profile); a
# variable set in your environment wins, e.g. `RAY_SERVE_ENABLE_HA_PROXY=0 make run`.
# CONFIG picks another serve config, e.g. a GPU one: make run CONFIG=deployments/gpu-one-node.yaml
CONFIG ?= deployments/local.yaml
run: setup
	$(BIN)/python -m serve_app.rayenv $(BIN)/serve run $(CONFIG)

test: setup
	$(BIN)/python -m pytest tests

test-unit: setup
	$(BIN)/python -m pytest tests/unit

# The fake multi-node cluster alone (under a minute; `make test` runs it too).
test-cluster: setup
	$(BIN)/python -m pytest -s tests/cluster

# Prometheus on 127.0.0.1:9090 for the miner that `make run` started (Ray's discovery file
# names its metrics endpoints), with the SLO rules and alerts.
prometheus: setup
	prometheus --config.file=monitoring/prometheus.yml --storage.tsdb.path=.prometheus \
	  --storage.tsdb.retention.time=35d --web.listen-address=127.0.0.1:9090

bench: setup
	$(BIN)/python benchmarks/embeddings.py

clean:
	rm -rf $(VENV) .pytest_cache .prometheus
