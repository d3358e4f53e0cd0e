"""Scripts that take slimvlm apart to see where time, launches and host reads go: a generate() call
per method, a stage-1 method's vision tower, one prefill's op sites, the host time of a decode step,
one LLaVA-Mini training step, the ops of a DualSpeed training step, and the GPU stage benchmarks (gpu_bench_stage.sh). Each file's
docstring gives its command, run from the repository root (e.g.
``PYTHONPATH=src python3 -m experiments.profiling.profile_generate --device cuda``)."""
