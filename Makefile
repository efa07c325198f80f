# Two commands a user needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch would pull several GB of CUDA packages.
# constraints.txt pins the rest to the versions the suite is tested with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,lora,judges,report,trackers]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefopt demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
