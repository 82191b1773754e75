# `make test` and `make demo` each set up their own venv from requirements.txt on a fresh machine; `make test` and
# `make app` add requirements-demo.txt (Gradio + Selenium, installed with --no-deps: see that file); `make test` adds
# requirements-int8.txt (torchao, for quantize_omnivmed.py: see that file) and requirements-scaleout.txt (DeepSpeed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo app venv demo-venv int8-venv scaleout-venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo-venv: $(VENV)/.installed-demo

$(VENV)/.installed-demo: requirements-demo.txt $(VENV)/.installed
	$(PY) -m pip install -q --no-deps -r requirements-demo.txt
	touch $@

int8-venv: $(VENV)/.installed-int8

$(VENV)/.installed-int8: requirements-int8.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-int8.txt
	touch $@

scaleout-venv: $(VENV)/.installed-scaleout

$(VENV)/.installed-scaleout: requirements-scaleout.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-scaleout.txt
	touch $@

test: venv demo-venv int8-venv scaleout-venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) train_trl.py

app: demo-venv
	$(PY) app.py

clean:
	rm -rf $(VENV) runs
