# The targets CI runs. `make up` starts the whole system; `make test` runs every check and test.
VENV := .venv
PY := $(VENV)/bin/python
CORE := services/snaplearn_common vision_server/snaplearn_vision recommender_worker/snaplearn_recommender clients/python/snaplearn_client

.PHONY: up demo test check lint format typecheck protos check-protos pytest venv kafka-start kafka-stop

venv:
	@bash scripts/bootstrap.sh

up: venv
	$(PY) -m snaplearn_common.launcher up

demo: venv
	$(PY) -m snaplearn_client.cli demo

test: venv check pytest

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
