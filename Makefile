# Developer entry points for DigiVault Conversations (GNU make). The local
# PostgreSQL, RabbitMQ and Redis come from deploy/dev/services.py. `make help` lists
# the targets.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PORT ?= 8080
PYTEST_ARGS ?=
BENCH_QUICK ?=
BENCH_PROFILE ?=
BENCH_ONLY ?=

VENV := .venv
SERVICES := deploy/dev/services.py
INSTALL_PACKAGES := deploy/dev/install_packages.py
JWT_SECRET := .dev/jwt-secret
ASYNCAPI_TOOLS := tools/asyncapi
BENCH_INSTALLED := $(VENV)/.bench-installed

# Starts a recipe line that needs the services: exports DATABASE_URL, AMQP_URL
# and RATE_LIMIT_REDIS_URL from the services script, and the dev JWT secret unless the
# environment already has JWT_HS256_SECRETS.
WITH_ENV = eval "$$($(SERVICES) env)"; \
	export JWT_HS256_SECRETS="$${JWT_HS256_SECRETS:-$$(cat $(JWT_SECRET))}";

.PHONY: help venv services-up services-down env migrate run test lint bench clean

help:
	@echo 'make venv           .venv with the package (editable) and its dev extras'
	@echo 'make services-up    start the local PostgreSQL, RabbitMQ and Redis (deploy/dev/services.py)'
	@echo 'make services-down  stop them (the data stays in .dev/)'
	@echo 'make env            print export lines: DATABASE_URL, AMQP_URL, RATE_LIMIT_REDIS_URL, JWT_HS256_SECRETS'
	@echo 'make migrate        apply the database migrations'
	@echo 'make run            migrate, print a dev token and curl examples, serve on 127.0.0.1:$$PORT (8080)'
	@echo 'make test           run pytest against the local services (PYTEST_ARGS="-k foo"); installs the AsyncAPI validator (Node)'
	@echo 'make lint           ruff check, ruff format --check, shellcheck of the shell scripts'
	@echo 'make bench          benchmarks against peers in the same run, into docs/benchmarks.md (BENCH_QUICK=1: short run)'
	@echo 'make clean          stop the services, then delete .dev/ and .venv/'

venv: $(VENV)/.installed

# Debian ships venv's ensurepip apart, in python3-venv: installed when that is
# why venv failed. A half-made .venv is removed so that the next try starts over.
$(VENV)/bin/pip:
	@rm -rf $(VENV)
	@if ! out=$$(python3 -m venv $(VENV) 2>&1); then \
		rm -rf $(VENV); \
		if [[ $$out != *ensurepip* ]]; then echo "$$out" >&2; exit 1; fi; \
		$(INSTALL_PACKAGES) python3-venv; \
		python3 -m venv $(VENV); \
	fi

# Reinstalled only when pyproject.toml changes; pip is order-only so that its
# own upgrades do not trigger a reinstall.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/pip
	$(VENV)/bin/pip install -e '.[dev]'
	@touch $@

# The official AsyncAPI parser, a Node package, validates docs/asyncapi.json in
# tests/test_asyncapi.py: Debian's nodejs and npm are installed when missing,
# then the locked versions. Reinstalled only when the lock changes. No
# dependency needs an install script; the one there (scarf) only reports usage.
$(ASYNCAPI_TOOLS)/node_modules/.installed: $(ASYNCAPI_TOOLS)/package-lock.json
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
		$(INSTALL_PACKAGES) nodejs npm; \
	fi
	npm ci --prefix $(ASYNCAPI_TOOLS) --no-audit --no-fund --ignore-scripts
	@touch $@

# The bench extra (FastAPI, uvicorn, py-spy) only for `make bench`, never for `make test`.
$(BENCH_INSTALLED): pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -e '.[dev,bench]'
	@touch $@

services-up:
	@$(SERVICES) up

services-down:
	@$(SERVICES) down

# Random, made once per checkout, readable by its owner only.
$(JWT_SECRET):
	@mkdir -p $(@D)
	@umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(36))' >$@.tmp
	@mv $@.tmp $@

env: $(JWT_SECRET)
	@$(SERVICES) env
	@printf 'export JWT_HS256_SECRETS=%q\n' "$${JWT_HS256_SECRETS:-$$(cat $(JWT_SECRET))}"

migrate: venv services-up $(JWT_SECRET)
	@$(WITH_ENV) LOG_FORMAT=$${LOG_FORMAT:-console} $(VENV)/bin/conversations migrate

run: venv services-up migrate
	@$(WITH_ENV) \
	token=$$($(VENV)/bin/conversations token --account acct_dev \
		--scope "conversations:read conversations:write"); \
	echo; \
	echo 'Dev bearer token (account acct_dev, scopes conversations:read conversations:write):'; \
	echo "export TOKEN=$$token"; \
	echo 'List, then create a conversation:'; \
	echo 'curl -s -H "Authorization: Bearer $$TOKEN" http://127.0.0.1:$(PORT)/v1/conversations'; \
	echo 'curl -s -H "Authorization: Bearer $$TOKEN" -d contact_id=WAz8eIbvDR60rouK http://127.0.0.1:$(PORT)/v1/conversations'; \
	echo; \
	export PORT=$(PORT) HOST=127.0.0.1 LOG_FORMAT=console; \
	exec $(VENV)/bin/conversations serve

test: venv services-up $(JWT_SECRET) $(ASYNCAPI_TOOLS)/node_modules/.installed
	@$(WITH_ENV) $(VENV)/bin/pytest $(PYTEST_ARGS)

# shellcheck is Debian's, installed when missing; .ci/run is the one shell script left.
lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	@command -v shellcheck >/dev/null || $(INSTALL_PACKAGES) shellcheck
	shellcheck .ci/run

# Seeds its own database, starts the service and its peers on free loopback ports, drives them
# with wrk and pgbench (tests/bench/run.py). wrk is Debian's; pgbench comes with PostgreSQL.
bench: venv services-up $(JWT_SECRET) $(BENCH_INSTALLED)
	@command -v wrk >/dev/null || $(INSTALL_PACKAGES) wrk
	@$(WITH_ENV) $(VENV)/bin/python -m tests.bench.run \
		$(if $(filter 1,$(BENCH_QUICK)),--quick) $(if $(filter 1,$(BENCH_PROFILE)),--profile) \
		$(foreach scenario,$(BENCH_ONLY),--only $(scenario))

# Services first: a stop that fails ends make here, before anything is deleted
# under a running server. When PostgreSQL's files live in /var/tmp (see
# services.py), .dev/pg links there: that directory goes too.
clean:
	@$(SERVICES) down
	@if [[ -L .dev/pg ]]; then rm -rf -- "$$(readlink .dev/pg)"; fi
	rm -rf .dev $(VENV) tools/asyncapi/node_modules
