# One command to set up and classify, one to set up and test. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The torch/torchvision pair installed here; pyproject.toml declares the supported ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: predict test clean-venv

$(BIN)/.ecanfnet-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[onnx,train]" $(TORCH_PIN)
	touch $@

$(BIN)/.ecanfnet-test-installed: $(BIN)/.ecanfnet-installed
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCH_PIN)
	touch $@

## make predict IMAGES="photo.jpg folder/" [WEIGHTS=src] [ARGS="--format json"]
predict: $(BIN)/.ecanfnet-installed
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="photo.jpg folder/" [WEIGHTS=SRC] [ARGS=...]' >&2; exit 2; }
	$(BIN)/ecanfnet predict $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(ARGS) $(IMAGES)

## make test [PYTEST_ARGS=...]
test: $(BIN)/.ecanfnet-test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
