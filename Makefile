# One command to set up and classify, one to set up and test. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The torch/torchvision pair installed here; pyproject.toml declares the supported ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: predict serve test browser clean-venv

$(BIN)/.ecanfnet-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[onnx,openvino,train,serve]" $(TORCH_PIN)
	touch $@

$(BIN)/.ecanfnet-test-installed: $(BIN)/.ecanfnet-installed
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCH_PIN)
	touch $@

## make predict IMAGES="photo.jpg folder/" [WEIGHTS=src] [ARGS="--format json"]
predict: $(BIN)/.ecanfnet-installed
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="photo.jpg folder/" [WEIGHTS=SRC] [ARGS=...]' >&2; exit 2; }
	$(BIN)/ecanfnet predict $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(ARGS) $(IMAGES)

## make serve [WEIGHTS=src] [ARGS="--port 8000"]
serve: $(BIN)/.ecanfnet-installed
	$(BIN)/ecanfnet serve $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(ARGS)

## make test [PYTEST_ARGS=...]
test: $(BIN)/.ecanfnet-test-installed browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser test drives Debian's chromium through chromedriver; install them when missing (needs root).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium + chromium-driver (Debian) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver missing and cannot be installed here; the browser test will be skipped" >&2; fi

clean-venv:
	rm -rf $(VENV)
