# Developer entry points. `make setup` is idempotent: it reruns only when
# pyproject.toml changes (or the virtualenv is missing).

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.stamp
# tool:Debian package (a tool starting with / is a file that must exist). The tests need
# binutils and gcc for guests, AFL++ for the AFL++ bridge, gdb for the gdb stub, and real
# static Linux programs and their baselines for the Linux personality.
SYSTEM_TOOLS := as:binutils ld:binutils objcopy:binutils gcc:gcc afl-fuzz:afl++ gdb:gdb \
                busybox:busybox-static musl-gcc:musl-tools qemu-x86_64:qemu-user \
                /usr/lib/x86_64-linux-gnu/libz.a:zlib1g-dev
BENCH_TOOLS := qemu-system-x86_64:qemu-system-x86
HELLO_CONFIGS := configs/hello_real.yaml configs/hello_protected.yaml \
                 configs/hello_long.yaml configs/hello_user.yaml

.PHONY: all setup system-packages install-tools run test bench clean

all: test

setup: $(STAMP)

$(STAMP): pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(VENV)/bin/python -m compileall -q minivmm    # a shell with PYTHONDONTWRITEBYTECODE still reads .pyc
	touch $@

system-packages:
	@$(MAKE) --no-print-directory install-tools TOOLS="$(SYSTEM_TOOLS)"

install-tools:
	@missing=""; \
	for pair in $(TOOLS); do \
		tool=$${pair%%:*}; \
		case $$tool in \
			/*) test -e $$tool ;; \
			*) command -v $$tool >/dev/null 2>&1 ;; \
		esac || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "missing:$$missing; as root, run: apt-get install -y$$missing" >&2; \
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
	@$(MAKE) --no-print-directory install-tools TOOLS="$(BENCH_TOOLS)"
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) build dist benchmarks/build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
