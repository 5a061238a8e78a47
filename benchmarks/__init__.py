"""Benchmarks of qkernels against PyTorch peers. Run them all with `python -m benchmarks.run_all`."""
