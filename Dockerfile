# mone-train for NVIDIA GPUs.
#
# Base image: nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
#   - CUDA 12.8 matches the CUDA 12 runtime that torch's PyPI wheels bring with them, so the
#     driver-side requirements line up;
#   - "devel" provides nvcc, which deepspeed needs to JIT-build its ops (Triton ships its own
#     ptxas);
#   - Ubuntu 24.04's python3 is 3.12, which megatron-core 0.16.1 supports.
# The package is installed by scripts/install.sh, the same script `make train` and `make test`
# run: every version comes from pyproject.toml, none is repeated here.
#
# Build:            docker build -t mone-train .
# One GPU:          docker run --gpus all --rm -v "$PWD/runs:/opt/mone-train/runs" mone-train \
#                     mone-train model=small
# Eight GPUs, EP 8: docker run --gpus all --ipc=host --rm -v "$PWD/runs:/opt/mone-train/runs" \
#                     mone-train launch/torchrun.sh 8 trainer.expert_parallel_size=8
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mone-train
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY mone_kernels/ mone_kernels/
COPY mone_train/ mone_train/
COPY launch/ launch/
COPY benchmarks/ benchmarks/
RUN PYTHON=python3 bash scripts/install.sh /opt/mone-train/.venv

ENV PATH=/opt/mone-train/.venv/bin:$PATH \
    TORCHRUN=/opt/mone-train/.venv/bin/torchrun \
    DEEPSPEED=/opt/mone-train/.venv/bin/deepspeed
CMD ["mone-train"]
