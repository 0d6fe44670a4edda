# The two front-door commands (see README): `make demo` and `make test`.
# Each creates .venv on first use and installs the project with what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint benchmark fuzz clean gpu-setup

$(STAMP): pyproject.toml scripts/test-constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c scripts/test-constraints.txt -e ".[cpu,test,lint,torch,timm,onnx,coco]"
	# onnxruntime's metadata asks numpy>=1.24.2 (mxnet 1.9.1 needs <1.24); 1.16.3 runs on 1.23.5 (tested)
	$(BIN)/python -m pip install -q --no-deps onnxruntime==1.16.3
	touch $(STAMP)

# The torch engine's own environment (issue 20, item 7): a PyTorch user's install, `pip install -e ".[torch]"`,
# with numpy 2 and no mxnet or gluoncv. tests/benchmarks/test_device_check_smoke.py runs the device check in it
# (train and evaluate of the exported C4 and FPN detectors). About 70 s and 5.6 GB (torch's CUDA build, from disk).
TORCH_VENV  := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
$(TORCH_STAMP): pyproject.toml scripts/test-constraints.txt
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q -c scripts/test-constraints.txt -e ".[torch]" "numpy>=2"
	touch $@

# Where a deployed detector runs (issue 24): onnxruntime, numpy and Pillow only, no torch, no mxnet, no bbadapt.
# tests/engines/torch/test_deploy.py feeds it decoded JPEGs through the exported ONNX file. About 15 s, 80 MB.
ORT_VENV  := .venv-ort
ORT_STAMP := $(ORT_VENV)/.installed
$(ORT_STAMP): scripts/deploy-requirements.txt
	test -x $(ORT_VENV)/bin/python || $(PYTHON) -m venv $(ORT_VENV)
	$(ORT_VENV)/bin/python -m pip install -q --upgrade pip
	$(ORT_VENV)/bin/python -m pip install -q -r scripts/deploy-requirements.txt
	touch $@

# Offline: converts the packaged, real pretrained CIFAR ResNet-20 v2 (gluoncv export files)
# to raw-RGB-0..255 input, an ImageNet ResNet-50 v2 with calibrated random weights, and builds
# a Faster R-CNN (raccoon) on a ResNet-18 v1b backbone, ready for `bbadapt train`.
demo: $(STAMP)
	$(BIN)/bbadapt convert cifar_resnet20_v2 --weights bbadapt/data/cifar_resnet20_v2-0000.params --to rgb255 --out out/cifar_resnet20_v2 --force
	$(BIN)/bbadapt convert resnet50_v2 --weights random --to rgb255 --out out/resnet50_v2 --force
	$(BIN)/bbadapt convert resnet18_v1b --weights random --detector faster-rcnn --classes raccoon --out out/frcnn_resnet18_v1b --force
	@echo "reports: out/cifar_resnet20_v2/report.html  out/resnet50_v2/report.html  out/frcnn_resnet18_v1b/report.html"
	@echo "train the detector: $(BIN)/bbadapt train out/frcnn_resnet18_v1b --dataset voc:tests/data/raccoon_voc --epochs 1 --cpu  (see docs/training.md)"

# Lint first: ruff, and import-linter's layer contract (pyproject.toml [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check bbadapt converters tests benchmarks
	$(BIN)/lint-imports

# One thread per worker, two workers: the 2-core CI machine, without oversubscription.
# MALLOC_MMAP_THRESHOLD_: glibc raises its mmap threshold after each freed large block, so the check's large
# arrays (float64 runs) came from the heap and were never returned: a worker running the zoo matrix grew to 13 GB
# and was OOM-killed. A fixed 1 MB threshold returns them (measured: 6.6 GB -> 3.2 GB after six deep nets).
# Two pytest runs split by directory: a worker process's memory only grows (mxnet and glibc keep
# what they allocated), and one process running every test reached 13 GB and was OOM-killed on a
# 24 GB machine. Run 1: the core, the check, bundles and the CLI; run 2: converters and detection.
# The slowest directories are collected first (xdist hands out tests in collection order): collected
# last, the benchmark smokes (70 s and 170 s) and the CLI's 20 s conversions left one worker busy
# alone at the end. Measured on 2 cores: run 1 14:09 instead of 15:18, run 2 14:05 instead of 15:32.
# --max-worker-restart=0: a worker that crashes fails the run at once. xdist's replacement worker, under
# --dist loadgroup, waited forever for work (seen here and on CI: a segfault at 97% of run 1, then idle until
# the CI limit). Run 1's workers never import torch (see tests/conftest.py): loading it beside MXNet crashed one.
FIRST_RUN  := tests/cli tests/core tests/platform tests/verify tests/bundle tests/test_architecture.py tests/test_xdist_groups.py
SECOND_RUN := tests/benchmarks tests/engines tests/converters
PYTEST      := OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=1048576 MXNET_HOME=$(CURDIR)/.pytest-mxnet-home \
               BBADAPT_TORCH_ONLY_PYTHON=$(CURDIR)/$(TORCH_VENV)/bin/python \
               BBADAPT_ORT_ONLY_PYTHON=$(CURDIR)/$(ORT_VENV)/bin/python \
               $(BIN)/python -m pytest -n 2 --dist loadgroup --max-worker-restart=0 -p no:cacheprovider --durations=30
# horovod has no binary wheels: built once per machine into ~/.cache/bbadapt/wheels/horovod-VERSION-py311-mxnetX/
# (scripts/horovod-wheel.sh), then installed from there in seconds.
HOROVOD := $(VENV)/.horovod
$(HOROVOD): $(STAMP) scripts/horovod-wheel.sh
	sh scripts/horovod-wheel.sh $(BIN)/python
	touch $@

# Real horovodrun jobs start 2 worker processes each: they run after the xdist pool, one at a time.
SERIAL := OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=1048576 MXNET_HOME=$(CURDIR)/.pytest-mxnet-home \
          $(BIN)/python -m pytest -p no:cacheprovider --durations=10
# report.html is tested in a real headless Chromium, from the system packages (root, as on CI).
CHROMIUM := $(VENV)/.chromium
$(CHROMIUM): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $@

test: lint $(HOROVOD) $(CHROMIUM) $(TORCH_STAMP) $(ORT_STAMP)
	$(PYTEST) -m "not horovod" $(FIRST_RUN)
	$(PYTEST) -m "not horovod" $(SECOND_RUN)
	$(SERIAL) -m horovod tests/engines/gluon/test_horovod.py

# Mutation fuzzing of every reader and `inspect` (a short run is part of `make test`); FUZZ_EXAMPLES per target.
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 MXNET_HOME=$(CURDIR)/.pytest-mxnet-home $(BIN)/python -m tests.converters.fuzz_readers all --examples $(FUZZ_EXAMPLES)

# GPU: its own venv (mxnet-cu112 replaces the CPU mxnet; docs/gpu.md), then `bbadapt doctor --gpu`,
# which fails with one line where no GPU mxnet-cu112 1.9.1 can run exists.
GPU_VENV := .venv-gpu
$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e ".[gpu,test]"
	touch $@
gpu-setup: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/bbadapt doctor --gpu

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bench_backbone.py

clean:
	rm -rf out .pytest-mxnet-home
