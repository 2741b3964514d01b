# make demo / make test create .venv on first use; the stamp keeps it from being redone.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-output
	$(BIN)/visbatch classify fixtures/images --model efficientnet-lite0 \
		-o demo-output/classify.parquet --overlays demo-output/overlays --workers 2
	@echo "results:  demo-output/classify.parquet"
	@echo "overlays: demo-output/overlays/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output build dist *.egg-info
