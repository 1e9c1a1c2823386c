# Two set-up commands (see README): `make demo` and `make test`. Both create the virtual
# environment on first use: torch first (TORCH_SPEC, e.g. a CUDA build via --index-url), then the
# project, so pip never swaps in another torch build.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= test,s3
CONFIG      ?= launch/configs/default.yaml
SHARDS      ?= data_shards/built
PY          := $(VENV)/bin/python

# CPU by default (this is what the demo and the tests run on); GPU users override.
export DS_ACCELERATOR ?= cpu
# Ops that DeepSpeed JIT-builds (none on CPU, where mera turns its shm all-reduce off; on GPU e.g.
# the CPU Adam of ZeRO-Offload) are built under a lock in TORCH_EXTENSIONS_DIR: one directory per
# venv, so a job never waits on another checkout's build or on a lock a killed build left.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup system-deps demo shards mcl-shards test test-slow test-all bench-mcl bench-mcl-full \
	image-cpu test-image clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# What the tests need from Debian's packages: shellcheck (the shell scripts' linter) and iproute2
# (the two-node test's network namespaces). Installed when missing and apt-get can (as root);
# otherwise those tests say what is missing (and fail under CI=true).
SYSTEM_TOOLS := shellcheck:shellcheck ip:iproute2
system-deps:
	@missing="$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done)"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then echo "not installed (tests that need them skip): $$missing"; fi

$(SHARDS)/.done: $(VENV)/.installed
	$(VENV)/bin/mera shards synth --out $(SHARDS)
	touch $@

shards: $(SHARDS)/.done

# The MCL benchmark's data: the compositional tasks (1000 eval samples per modality) and the
# pretrained base LLM (docs/DATA.md §6).
MCL_SHARDS  ?= data_shards/mcl
$(MCL_SHARDS)/.done: $(VENV)/.installed
	$(VENV)/bin/mera shards synth --tasks compositional --eval-per-modality 1000 --out $(MCL_SHARDS)
	rm -rf $(MCL_SHARDS)/base
	$(VENV)/bin/mera shards base --out $(MCL_SHARDS)/base
	touch $@

mcl-shards: $(MCL_SHARDS)/.done

demo: setup shards
	$(VENV)/bin/mera run $(CONFIG) --resume

test: setup system-deps
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

test-all: setup system-deps
	$(PY) -m pytest -q tests

# The MCL benchmark as BENCHMARKS.md reports it: 3 orders x 3 seeds of launch/configs/mcl.yaml,
# then mean and spread. Each run resumes if it is already there; two run at a time, one thread
# each (2 cores).
MCL_ORDERS ?= image,video,audio,depth video,audio,depth,image depth,audio,video,image
MCL_SEEDS  ?= 0 1 2
MCL_JOBS   ?= 2
# e.g. MCL_METHODS=mera-10,mera-avg,mera-ties,mera-dare,mera-pcb,replay-10 MCL_OUT=runs/mcl15
MCL_METHODS ?=
MCL_OUT    ?= runs/mcl
MCL_CONFIG ?= launch/configs/mcl.yaml
# config fields set over MCL_CONFIG's, e.g. MCL_SET=stages.finetune.lora=null (full finetunes)
MCL_SET    ?=
bench-mcl: setup mcl-shards
	mkdir -p $(MCL_OUT)
	printf '%s\n' $(foreach o,$(MCL_ORDERS),$(foreach s,$(MCL_SEEDS),"$(o) $(s)")) | \
	  OMP_NUM_THREADS=1 xargs -P $(MCL_JOBS) -L 1 sh -c \
	  '$(VENV)/bin/mera bench mcl --config $(MCL_CONFIG) --order $$0 --seed $$1 --resume \
	   --out $(MCL_OUT)/$$0-s$$1 \
	   $(if $(MCL_METHODS),--methods $(MCL_METHODS)) $(foreach s,$(MCL_SET),--set $(s)) \
	   > $(MCL_OUT)/$$0-s$$1.log 2>&1 \
	   || { echo "failed: see $(MCL_OUT)/$$0-s$$1.log"; exit 255; }'
	$(VENV)/bin/mera bench mcl-summary $(MCL_OUT)/*/mcl.json

# The same benchmark with full finetunes (every LLM weight) instead of LoRA, at the rate chosen the
# same way for them (BENCHMARKS.md: the closest to LLaVA's full-finetune 2e-5 that learns every
# task on single-modality runs); the realign at the finetune's connector rate, as mcl.yaml's.
MCL_FULL_SET := stages.finetune.lora=null stages.finetune.lr_llm=3.0e-4 \
	stages.finetune.lr_connector=3.0e-4 stages.realign.lr=3.0e-4
MCL_FULL_OUT ?= runs/mcl-full
bench-mcl-full:
	$(MAKE) bench-mcl MCL_SET="$(MCL_FULL_SET)" MCL_OUT=$(MCL_FULL_OUT)

# Container images (docker/README.md): the CPU image, built with podman on a Debian base made by
# mmdebstrap (cached in ~/.cache/mera-ds-image); test-image also runs the embedded default cut to
# two modalities to its report inside it, as uid 1000.
image-cpu:
	docker/build-cpu.sh

test-image:
	docker/build-cpu.sh --test

clean:
	rm -rf runs $(SHARDS)
