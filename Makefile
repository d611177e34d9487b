# microseg — see README.md. Everything runs as root on Debian 12.
#
#   make setup                 install/verify everything (idempotent, quick when done)
#   make test [PYTEST_ARGS=…]  the whole suite, real kernel and real traffic
#   make run [IFACE=eth0] [KAFKA=host:port] [STATE=dir] [POLICY=file]
#   make bench | lint | clean
#   make install [DESTDIR=root] [PREFIX=/opt/microseg] [WHEEL=file] | rollback | uninstall [PURGE=1]

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
MICROSEG ?= $(VENV)/bin/microseg
STATE    ?= /var/lib/microseg
POLICY   ?= examples/policies.json
IFACE    ?=
KAFKA    ?=
PYTEST_ARGS ?=
TRAFFIC_LOG ?= $(STATE)/lab-traffic.log

RUN_ARGS = --policy-file $(POLICY) --events-file $(STATE)/events.jsonl \
           --state-dir $(STATE) --stats-interval 5 --print-events $(if $(KAFKA),--kafka $(KAFKA))

.PHONY: help setup test run bench lint clean install rollback uninstall

help:
	@sed -n '1,9s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

setup:
	@scripts/setup.sh

test: setup
	@exec $(PY) -m pytest $(PYTEST_ARGS)

# The demo: a lab (two netns + veth), the agent on the lab's host end, demo traffic from
# the peer. Ctrl-C stops the agent; the trap then stops the traffic and removes the lab.
# With IFACE=… the agent attaches to real interface(s) instead, and no lab is made.
run: setup
	@mkdir -p $(STATE)
	if [ -n "$(IFACE)" ]; then
	    exec $(MICROSEG) run $(foreach i,$(IFACE),--iface $(i)) $(RUN_ARGS)
	fi
	traffic_pid=
	cleanup() {
	    trap - EXIT INT TERM
	    if [ -n "$$traffic_pid" ]; then kill -TERM "$$traffic_pid" 2>/dev/null || true; fi
	    wait 2>/dev/null || true
	    $(MICROSEG) lab down || true
	}
	trap cleanup EXIT
	trap 'exit 0' INT
	trap 'exit 143' TERM
	$(MICROSEG) lab up
	host_ns="$$($(MICROSEG) lab show --field host_ns)"
	host_if="$$($(MICROSEG) lab show --field host_if)"
	$(MICROSEG) lab traffic >"$(TRAFFIC_LOG)" 2>&1 &
	traffic_pid=$$!
	echo "demo traffic: tail -f $(TRAFFIC_LOG)"
	echo "failsafe is off in the demo lab (its policy denies SSH to show a deny); on a real interface (IFACE=...) it stays on"
	$(MICROSEG) run --netns "$$host_ns" --iface "$$host_if" --failsafe none $(RUN_ARGS)

# Every suite (datapath micro-benchmarks, admin API, flow events to Kafka, side by side with
# nftables on real traffic, a fleet of agents through Kafka): tables on stdout,
# bench/results.json, docs/bench.png. About 26 minutes on 2 cores.
# BENCH_ARGS='--only compare' (or --only fleet, --quick, --compare-runs N, ...).
BENCH_ARGS ?=
bench: setup
	@exec $(PY) -m bench $(BENCH_ARGS)

lint: setup
	@rc=0
	$(VENV)/bin/ruff check . || rc=1
	$(VENV)/bin/mypy || rc=1
	exit $$rc

# A local single-node Kafka (KRaft) on 127.0.0.1:$(KAFKA_PORT), jars from the cache `setup`
# fills; data and logs in a temporary directory that kafka-stop removes. See scripts/kafka.sh.
# For a fleet across hosts: KAFKA_LISTEN=0.0.0.0:9092 KAFKA_ADVERTISED=this-host:9092 (the
# address the other hosts' agents reach it at; it defaults to KAFKA_LISTEN).
KAFKA_PORT ?= 9092
KAFKA_LISTEN ?=
KAFKA_ADVERTISED ?=
KAFKA_WHERE = $(if $(KAFKA_LISTEN),--listen $(KAFKA_LISTEN),--port $(KAFKA_PORT))

.PHONY: kafka kafka-stop

kafka: setup
	@scripts/kafka.sh start $(KAFKA_WHERE) $(if $(KAFKA_ADVERTISED),--advertised $(KAFKA_ADVERTISED))

kafka-stop:
	@scripts/kafka.sh stop $(KAFKA_WHERE)

# The agent as a systemd service on this host (scripts/install.sh says what goes where):
# the wheel in a venv of its own under $(PREFIX)/<version>, /etc/microseg (kept on upgrade),
# /var/lib/microseg, /etc/systemd/system/microseg.service. DESTDIR= stages into a root.
# Not after `setup`: a host needs only Debian's python3-venv, python3-bpfcc and headers.
PREFIX ?= /opt/microseg
WHEEL ?=
PURGE ?=
INSTALL_ARGS = --prefix $(PREFIX)

install:
	@DESTDIR="$(DESTDIR)" scripts/install.sh $(INSTALL_ARGS) $(if $(WHEEL),--wheel $(WHEEL))

rollback:
	@DESTDIR="$(DESTDIR)" scripts/install.sh $(INSTALL_ARGS) --rollback

uninstall:
	@DESTDIR="$(DESTDIR)" scripts/install.sh $(INSTALL_ARGS) --uninstall $(if $(PURGE),--purge)

clean:
	@rm -rf .pytest_cache .mypy_cache .ruff_cache build dist
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
