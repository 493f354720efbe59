# Developer entry points. `make setup` is idempotent: it reruns only when
# pyproject.toml changes (or the virtualenv is missing).

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.stamp
SYSTEM_TOOLS := as ld objcopy gcc
SYSTEM_PACKAGES := binutils gcc
HELLO_CONFIGS := configs/hello_real.yaml configs/hello_protected.yaml \
                 configs/hello_long.yaml configs/hello_user.yaml

.PHONY: all setup system-packages run test bench clean

all: test

setup: $(STAMP)

$(STAMP): pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

system-packages:
	@missing=""; \
	for tool in $(SYSTEM_TOOLS); do \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "missing:$$missing; installing $(SYSTEM_PACKAGES)"; \
			apt-get update && apt-get install -y $(SYSTEM_PACKAGES); \
		else \
			echo "missing:$$missing; as root, run: apt-get install -y $(SYSTEM_PACKAGES)" >&2; \
		fi; \
	fi

run: setup
	@for config in $(HELLO_CONFIGS); do \
		echo "== $$config"; \
		$(VENV)/bin/minivmm run $$config || exit 1; \
	done

test: setup
	$(VENV)/bin/python -m pytest -n 2 -q

bench: setup
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) build dist benchmarks/build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
