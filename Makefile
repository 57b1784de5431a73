# The two commands: `make demo` and `make test`. Both do all set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, from the local CPU wheel: never let pip resolve a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test check proto proto-check venv clean sysdeps
# The pinned protobuf code generator lives in its own venv (see proto/generate.py).
PROTO_VENV := .venv-proto
PROTO_STAMP := $(PROTO_VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The live demo: the service and a 4-rank CPU MoE engine, rebalanced while it serves.
demo: $(STAMP)
	$(BIN)/eplb demo

$(PROTO_STAMP): proto/generate.py
	test -x $(PROTO_VENV)/bin/python || $(PY) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install -q "grpcio-tools==$$(sed -n 's/^GRPCIO_TOOLS = "\(.*\)"/\1/p' proto/generate.py)"
	touch $(PROTO_STAMP)

# Regenerate eplb_proto/ from proto/eplb/v1/*.proto (commit the result).
proto: $(PROTO_STAMP)
	$(PROTO_VENV)/bin/python proto/generate.py

proto-check: $(PROTO_STAMP)
	$(PROTO_VENV)/bin/python proto/generate.py --check

check: $(STAMP) proto-check
	$(BIN)/ruff check eplb_service worker_agent eplb_engine tests benchmarks proto
	$(BIN)/mypy

# Servers the tests start themselves: redis-server (store, HA) and prometheus + promtool
# (metrics scrape). Debian's packages, installed only when missing.
SYSDEPS := redis-server:redis-server prometheus:prometheus promtool:prometheus
sysdeps:
	@missing=$$(for dep in $(SYSDEPS); do command -v $${dep%%:*} >/dev/null || echo $${dep##*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing $$missing"; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(STAMP) check sysdeps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(PROTO_VENV) .pytest_cache .mypy_cache .ruff_cache
