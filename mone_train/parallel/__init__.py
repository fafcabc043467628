"""Parallelism: process groups (data, tensor, pipeline, expert), the pipeline schedule,
all-to-all traffic statistics, and the narrow patches that let megatron-core run without CUDA."""
