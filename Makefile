# mmssl: the two commands a new user runs (see README.md), plus lint.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MMSSL  := $(BIN)/mmssl
DATA   := data/asterisk
RUN    := runs/quickstart
NPROC  ?= 2
ASTERISK_PKGS := asterisk-core-sounds-en-wav asterisk-core-sounds-en
FASHION_PKGS  := dataset-fashion-mnist
KTUBERLING_PKGS := ktuberling-data librsvg2-bin

.PHONY: quickstart test lint install data-deps shards clean-quickstart

install: $(STAMP)

# torch + torchvision first, pinned by constraints.txt; then the project under the same constraints so no
# dependency can swap the torch build (see README, "Installing").
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The bundled real data sets come from Debian packages; install them when we can, else say how.
# asterisk-core-sounds-en(-wav): the quickstart's speech + transcripts; dataset-fashion-mnist: the image source;
# ktuberling-data + librsvg2-bin (rsvg-convert): the drawings / spoken words / written words of the tri-modal recipes.
data-deps:
	@missing=""; \
	[ -d /usr/share/asterisk/sounds/en_US_f_Allison ] && [ -f /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz ] \
	  || missing="$(ASTERISK_PKGS)"; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing $(FASHION_PKGS)"; \
	[ -d /usr/share/ktuberling/pics ] && command -v rsvg-convert >/dev/null || missing="$$missing $(KTUBERLING_PKGS)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    apt-get install -y --no-install-recommends $$missing >/dev/null || \
	      { apt-get update >/dev/null && apt-get install -y --no-install-recommends $$missing >/dev/null; }; \
	  else \
	    echo "The bundled data is missing. Install it with:"; \
	    echo "  sudo apt-get install -y --no-install-recommends$$missing"; exit 1; \
	  fi; \
	fi

$(DATA)/train/index.json: | $(STAMP) data-deps
	$(MMSSL) make-shards asterisk --out $(DATA)

shards: $(DATA)/train/index.json

quickstart: $(STAMP) data-deps shards
	$(MMSSL) pretrain quickstart --nproc $(NPROC) --run-dir $(RUN) --overwrite
	$(MMSSL) export $(RUN) --out $(RUN)/export
	$(MMSSL) probe $(RUN)/export/audio --shards $(DATA)/train --test-shards $(DATA)/test --label family \
	  --json $(RUN)/eval/probe.json
	$(MMSSL) retrieval $(RUN)/export --shards $(DATA)/test --query audio --target text --match-field text \
	  --json $(RUN)/eval/retrieval.json
	$(MMSSL) report $(RUN)
	$(MMSSL) evaluate $(RUN) --shards $(DATA)/train --test-shards $(DATA)/test --label family --match-field text

test: $(STAMP) data-deps
	$(BIN)/pytest -q

# import-linter reads a package from one directory: the rooms are copied into build/lint/mmssl, laid out as installed
LINT_TREE := build/lint
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/mmssl
	cp api/*.py $(LINT_TREE)/mmssl/ && cp -r pretrain objectives architectures data_pipelines tools recipes $(LINT_TREE)/mmssl/
	cd $(LINT_TREE) && $(abspath $(BIN))/lint-imports $(abspath pyproject.toml)

clean-quickstart:
	rm -rf $(RUN) $(DATA)
