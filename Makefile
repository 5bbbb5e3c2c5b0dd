# Two commands a new user needs: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/frcnn-shard
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned together with the torchvision built for it (torchvision 0.29.1 needs torch 2.14.1),
# so the package's requirements are already met; then the package with its dev, viz and torchvision
# extras (the torchvision extra adds pycocotools).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,viz,torchvision]"
	touch $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(CLI) sample $(DEMO)/hub
	$(CLI) build --source $(DEMO)/hub --split train --out $(DEMO)/shards --rows-per-shard 16
	$(CLI) check $(DEMO)/shards/train
	$(CLI) info $(DEMO)/shards/train
	$(CLI) show $(DEMO)/shards/train --index 0 --index 1 --index 2 --index 3 --anchors --out $(DEMO)/show.png
	$(CLI) stats $(DEMO)/shards/train --out $(DEMO)/stats.png
	@echo
	@echo "Demo shards:  $(DEMO)/shards/train   (manifest.json, train-*.tar)"
	@echo "Pictures:     $(DEMO)/show.png  $(DEMO)/stats.png"

test: install
	$(PY) -m ruff check frcnn_shard tests scripts
	$(PY) -m pytest -q tests

bench: install
	$(PY) scripts/bench_build.py
	$(PY) scripts/bench_loader.py
	$(PY) scripts/bench_check.py
	$(PY) scripts/bench_scale.py
	$(PY) scripts/bench_torchvision.py

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
