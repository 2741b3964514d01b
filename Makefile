# make demo / make test create .venv on first use; the stamp keeps it from being redone.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip install -q --upgrade pip
	@# The editable-install notice of setuptools is not visbatch's output; deprecation warnings are fixed in pyproject.
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-output
	$(BIN)/visbatch saliency fixtures/images --model efficientnet-lite0 --method gradcam --eval \
		-o demo-output/saliency.parquet --overlays demo-output/overlays --overlay-style side-by-side --workers 2
	@echo "results:  demo-output/saliency.parquet"
	@echo "overlays: demo-output/overlays/"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The quick loop: everything but the tests marked slow (subprocesses, the wheel, real weights).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core

clean:
	rm -rf $(VENV) demo-output build dist *.egg-info
