# Every target sets itself up: a virtual environment in .venv with escalate installed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider

.PHONY: demo test lint bench clean

# pip's and setuptools' chatter goes to a log, shown only when the install fails.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install --quiet --upgrade pip && \
	   $(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat \
	 ) > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# The command is shown, not the shell around it that reads its exit status.
# The tests' temporary folders (tmp_path, the throwaway PostgreSQL servers) go in memory
# where the machine has a writable /dev/shm: escalate fsyncs every write, and on a shared
# disk those waits were most of the suite's time (a process killed mid-write loses nothing
# either way; the disk-trouble tests mount file systems of their own). A TMPDIR given wins.
test: export TMPDIR := $(or $(TMPDIR),$(shell [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm))
test: $(STAMP)
	@echo "$(PYTEST)"
	@$(PYTEST); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check escalate tests bench
	$(BIN)/mypy

# Side by side with the revision in bench/baseline.txt: fails when a target is beyond its
# limit (each row shows it; docs/performance.md lists them), the PostgreSQL store on a
# throwaway server it starts. `bench/run.py` alone checks the fixed thresholds of docs/performance.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py --baseline

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench
	-git worktree prune 2>/dev/null
