# glmtune — `make train` sets everything up and fine-tunes the default job;
# `make test` runs the tests. Variables (MODEL=, DATA=, NUM_EPOCHS=, ...) map
# 1:1 to config fields: `make help` lists them, generated from the schema.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
GLMTUNE := $(BIN)/glmtune
STAMP   := $(VENV)/.installed-stamp

# The CPU seed wrote every prediction here; keep doing it.
PREDICTION_FILE ?= data/output/prediction.txt
export PREDICTION_FILE

.PHONY: help setup train data predict predict-custom test test-fast clean

help:
	@echo "make train            set up (first time) and fine-tune the default job"
	@echo "make predict          answer the demo prompt with the trained adapter"
	@echo 'make predict-custom PROMPT="..."'
	@echo "make eval             score the trained adapter (and its base) on the validation triplets"
	@echo "make batch-predict FILE=prompts.txt   answer a .txt/.jsonl of prompts (resumable)"
	@echo "make chat             talk to the trained adapter (/clear, /exit)"
	@echo "make export           merge the adapter into its base and save a standalone model"
	@echo "make test             run the test suite (what CI runs)"
	@echo "make test-fast        only the fast tests"
	@echo "make clean            remove what glmtune generated (asks; FORCE=1 skips)"
	@echo
	@echo "Variables (e.g. make train NUM_EPOCHS=3 BATCH_SIZE=8):"
	@$(GLMTUNE) config --make-vars 2>/dev/null || echo "  (run make setup first)"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt scripts/install.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	scripts/install.sh $(BIN)/python --editable
	touch $(STAMP)

# The synthetic triplet data is generated once; delete data/ to regenerate.
data/train_triplet.jsonl data/val_triplet.jsonl: | $(STAMP)
	$(GLMTUNE) data triplets --out data

data: data/train_triplet.jsonl

train: setup $(if $(DATA),,data)
	$(GLMTUNE) train --from-make

predict: setup
	$(GLMTUNE) predict --from-make

predict-custom: setup
	@test -n "$(PROMPT)" || { echo 'usage: make predict-custom PROMPT="your prompt"'; exit 2; }
	$(GLMTUNE) predict --from-make

# Using the trained adapter: ADAPTER= picks another one; every variable maps to a
# flag of the command (`make help`).
.PHONY: eval batch-predict chat export

eval: setup $(if $(EVAL_DATA),,data)
	$(GLMTUNE) eval --task triplet --from-make --compare-base

# Batch answers are JSON Lines, so they do not go to the single-answer .txt.
batch-predict: PREDICTION_FILE = data/output/predictions.jsonl
batch-predict: setup
	@test -n "$(FILE)" || { echo 'usage: make batch-predict FILE=prompts.txt (or .jsonl)'; exit 2; }
	$(GLMTUNE) predict --file "$(FILE)" --from-make

chat: setup
	$(GLMTUNE) chat --from-make

export: setup
	$(GLMTUNE) export --from-make

test: setup
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: setup
	$(BIN)/python -m pytest -q

# Only what glmtune itself generated: never user data or other adapters.
GENERATED = models/tiny-glm $(or $(OUTPUT_DIR),models/chatglm-lora) data/train_triplet.jsonl \
            data/val_triplet.jsonl data/output

clean:
	@if [ "$(FORCE)" != "1" ]; then \
	  printf 'Remove $(GENERATED)? [y/N] '; read answer || answer=n; \
	  case "$$answer" in y|Y|yes) ;; *) echo "nothing removed"; exit 0;; esac; \
	fi; \
	rm -rf $(GENERATED); echo "removed $(GENERATED)"
