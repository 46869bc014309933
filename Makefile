# The targets CI runs. `make up` starts the whole system; `make test` runs every check and test.
VENV := .venv
PY := $(VENV)/bin/python
CORE := services/snaplearn_common vision_server/snaplearn_vision recommender_worker/snaplearn_recommender clients/python/snaplearn_client

.PHONY: up demo test check lint format typecheck protos check-protos pytest venv kafka-start kafka-stop \
	deploy-check clients clients-go-gen proto-baseline

venv:
	@bash scripts/bootstrap.sh

up: venv
	$(PY) -m snaplearn_common.launcher up

demo: venv
	$(PY) -m snaplearn_client.cli demo

test: venv check deploy-check pytest

check: check-protos lint typecheck

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

pytest:
	$(PY) -m pytest tests

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

# Regenerate the committed Go stubs in clients/go/gen after changing protos/snaplearn.
clients-go-gen:
	rm -rf clients/go/gen
	PATH="$$(bash scripts/deploy_tools.sh):$$PATH" buf generate --template clients/go/buf.gen.yaml

# On a release: make the current protos the baseline `buf breaking` compares against.
proto-baseline:
	PATH="$$(bash scripts/deploy_tools.sh):$$PATH" buf build --exclude-source-info -o -#format=json \
		| $(PY) -m json.tool --indent 1 > protos/buf-baseline.json
