# The targets CI runs. `make up` starts the whole system; `make test` runs every check and test.
VENV := .venv
PY := $(VENV)/bin/python
# The packages mypy checks: every distribution's code except the generated stubs (protos/python).
CORE := services/snaplearn_common vision_server/snaplearn_vision recommender_worker/snaplearn_recommender \
	$(wildcard recommender_worker/snaplearn_offline) clients/python/snaplearn_client $(wildcard benchmarks/snaplearn_bench)
# pytest-xdist workers for the slow tiers; each test file stays on one worker (--dist loadfile),
# since a file's fixtures (servers, a Kafka broker) are shared by its tests.
PYTEST_WORKERS ?= 2

.PHONY: up test check lint format typecheck imports unit protos check-protos pytest venv kafka-start kafka-stop \
	deploy-check clients go-gen proto-baseline

venv:
	@bash scripts/bootstrap.sh

up: venv
	$(PY) -m snaplearn_common.launcher up

# Everything CI runs: the fast tier, the deployment files, then the integration and end-to-end tests.
test: venv check deploy-check pytest

# The fast tier (under two minutes on a warm machine): generated code, lint, types, import
# contracts (.importlinter: layers, no cycles), unit tests.
check: venv check-protos lint typecheck imports unit

check-protos:
	$(PY) scripts/gen_protos.py --check

protos: venv
	$(PY) scripts/gen_protos.py

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck:
	$(VENV)/bin/mypy $(CORE)

imports:
	$(VENV)/bin/lint-imports --config .importlinter

unit:
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests/unit

# The Kafka jars are fetched once before the workers start, so two workers never fetch at once.
pytest:
	bash scripts/kafka.sh fetch
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests/integration tests/e2e

kafka-start: venv
	bash scripts/kafka.sh fetch && bash scripts/kafka.sh start

kafka-stop:
	bash scripts/kafka.sh stop

# Deployment files (docker/, deploy/), the API contract (buf) and the Go stubs, validated offline;
# docs/DEPLOY.md says what is checked and what is not. Installs its tools on first use (cached).
deploy-check:
	bash scripts/deploy_check.sh

# Build the Go, Java and TypeScript example clients (tests/e2e/test_app_clients.py runs them).
clients:
	bash scripts/build_clients.sh

# Regenerate the committed Go stubs in protos/go/gen after changing protos/snaplearn.
go-gen:
	rm -rf protos/go/gen
	PATH="$$(bash scripts/deploy_tools.sh):$$PATH" buf generate --template protos/go/buf.gen.yaml

# On a release: make the current protos the baseline `buf breaking` compares against.
proto-baseline:
	PATH="$$(bash scripts/deploy_tools.sh):$$PATH" buf build --exclude-source-info -o -#format=json \
		| $(PY) -m json.tool --indent 1 > protos/buf-baseline.json
