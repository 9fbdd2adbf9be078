# The README's two commands are `make run SOURCE=... TARGET=...` and `make test`.
PYTHON ?= python3
SOURCE ?=
TARGET ?=

.PHONY: install install-test run test bench

install:
	tools/install.sh

install-test:
	tools/install.sh --test

# Live replication of SOURCE into TARGET on the embedded log (Ctrl-C stops it cleanly).
run: install
	@test -n "$(SOURCE)" -a -n "$(TARGET)" || { echo "usage: make run SOURCE=/data TARGET=/backup/data"; exit 2; }
	dt protect "$(SOURCE)" --to "$(TARGET)"

# The whole suite, every service it uses required (Kafka, FUSE): nothing is skipped.
test: install-test
	DT_REQUIRE_SERVICES=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: install-test
	$(PYTHON) bench/run.py
