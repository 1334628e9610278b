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

.PHONY: help setup train train-ddp data predict predict-custom test test-fast clean

help:
	@echo "make train            set up (first time) and fine-tune the default job"
	@echo "make predict          answer the demo prompt with the trained adapter"
	@echo 'make predict-custom PROMPT="..."'
	@echo "make eval             score the trained adapter (and its base) on the validation triplets"
	@echo "make batch-predict FILE=prompts.txt   answer a .txt/.jsonl of prompts (resumable)"
	@echo "make chat             talk to the trained adapter (/clear, /exit)"
	@echo "make export           merge the adapter into its base and save a standalone model"
	@echo "make serve            OpenAI-compatible API on 127.0.0.1:8000 (ADAPTER=a,b PORT= GLMTUNE_API_KEY=)"
	@echo "make train-ddp NPROC=2   the same training, data-parallel over NPROC processes (torchrun)"
	@echo "make plan             show hardware, chosen settings and predicted peak memory"
	@echo "make monitor          follow a running job's loss and memory (OUTPUT_DIR=...)"
	@echo "make webui            the web page: train, chat, evaluate, export (http://127.0.0.1:7860)"
	@echo "make bench-memory     measured peak memory vs prediction, 6B-shaped model (slow)"
	@echo "make bench            training tokens/s: glmtune vs HF Trainer fp32/bf16, GLM-241M (BENCH_STEPS=3 shortens)"
	@echo "make env              write .env for docker compose from this machine's plan (FORCE=1 replaces)"
	@echo "make docker-build / docker-train / docker-predict   the same in a container (GPU=1 for CUDA)"
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

# Data-parallel on one machine; for several machines run torchrun yourself
# (README: --nnodes, --rdzv-endpoint). Each process gets cores / NPROC threads.
NPROC ?= 2
train-ddp: setup $(if $(DATA),,data)
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m glmtune train --from-make

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

# An OpenAI-compatible API over the adapter (ADAPTER=, comma-separated for several)
# and its bare base, on 127.0.0.1 unless SERVE_HOST= says otherwise.
.PHONY: serve
serve: setup
	$(GLMTUNE) serve --from-make

.PHONY: plan monitor bench-memory bench

plan: setup
	$(GLMTUNE) plan --from-make

monitor: setup
	$(GLMTUNE) monitor $(if $(OUTPUT_DIR),--output-dir "$(OUTPUT_DIR)")

# The web UI on this machine only; WEBUI_HOST=0.0.0.0 opens it to the network.
.PHONY: webui
WEBUI_HOST ?= 127.0.0.1
WEBUI_PORT ?= 7860
webui: setup data
	$(GLMTUNE) webui --host $(WEBUI_HOST) --port $(WEBUI_PORT)

# Builds a 12 GB random ChatGLM3-6B-shaped checkpoint once (bench/cache/) and
# needs about 14 GB of free memory; BENCH_STEPS sets the steps per run.
bench-memory: setup
	$(BIN)/python bench/memory.py

# GLM-241M LoRA tokens/s: HF Trainer + PEFT fp32 / bf16 vs glmtune, matmul peak, RSS.
bench: setup
	$(BIN)/python bench/throughput.py

test: setup
	$(BIN)/ruff check glmtune tests bench examples
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

# ---------------------------------------------------------------- containers
# Optional: nothing above needs Docker. docker-compose.yml runs the targets
# above inside the image; `GPU=1` picks the CUDA image and the GPU services.

.PHONY: env docker-build docker-train docker-predict

# The .env docker compose reads; ENV_FILE= writes it elsewhere.
ENV_FILE ?= .env

# Settings planned for this machine (MODEL=... and friends are taken into
# account). Written beside the target and renamed, so a failed or interrupted
# plan never leaves a half-written .env; an existing one may hold edits.
env: setup
	@if [ -e "$(ENV_FILE)" ] && [ "$(FORCE)" != "1" ]; then \
	  echo "$(ENV_FILE) already exists; not replacing it (FORCE=1 does)"; exit 1; \
	fi; \
	tmp="$(ENV_FILE).tmp.$$$$"; \
	if $(GLMTUNE) plan --env --from-make > "$$tmp"; then mv -f "$$tmp" "$(ENV_FILE)"; \
	else rm -f "$$tmp"; exit 1; fi; \
	echo "wrote $(ENV_FILE)"

# The compose plugin where installed, else docker-compose 1.x (Debian's package).
DOCKER_COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 \
                    && echo "docker compose" || echo docker-compose)
DOCKER_SUFFIX = $(if $(filter 1 yes true,$(GPU)),-gpu)
# Files the container writes into data/ and models/ should belong to whoever
# runs make; the container user cannot be root, so root gets the default 1000.
DOCKER_UID = $(if $(filter 0,$(shell id -u)),1000,$(shell id -u))
DOCKER_GID = $(if $(filter 0,$(shell id -u)),1000,$(shell id -g))
DOCKER = USER_ID=$(DOCKER_UID) GROUP_ID=$(DOCKER_GID) \
         $(DOCKER_COMPOSE)$(if $(DOCKER_SUFFIX), --profile gpu)
# Variables given on this command line reach the container, so that
# `make docker-train NUM_EPOCHS=3` means what `make train NUM_EPOCHS=3` does;
# the ones that describe this checkout or this docker call stay here.
DOCKER_LOCAL = PYTHON VENV BIN GLMTUNE STAMP ENV_FILE FORCE GPU DOCKER_COMPOSE
DOCKER_PASS = $(foreach v,$(filter-out $(DOCKER_LOCAL),$(.VARIABLES)),\
              $(if $(filter command line,$(origin $(v))),-e $(v)="$$$(v)"))
# Values are expanded by the shell from the environment make exports them to,
# so spaces and quotes in PROMPT="..." survive.
DOCKER_RUN = $(strip $(DOCKER) run --rm $(DOCKER_PASS))

# Every CPU service shares the image train builds (the GPU ones, train-gpu's).
docker-build:
	$(DOCKER) build train$(DOCKER_SUFFIX)

# Docker would create missing bind-mount folders owned by root, which the
# container user could not write to. A `docker stop` leaves a checkpoint;
# running this again resumes from it.
docker-train: docker-build
	mkdir -p data models
	$(DOCKER_RUN) train$(DOCKER_SUFFIX)

# FILE= makes it a batch run, as `make batch-predict FILE=...` is natively.
docker-predict: docker-build
	mkdir -p data models
	$(DOCKER_RUN) $(if $(FILE),batch-predict,predict)$(DOCKER_SUFFIX)
