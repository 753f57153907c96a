"""Checks and benchmarks for a GPU machine: gpu_check (the one prepared command), gpu_memory, bench_stack,
bench_moe and calibrate_budget."""
