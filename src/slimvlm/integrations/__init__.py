"""slimvlm inside other tools' harnesses: lmms-eval's `--model slimvlm` (lmms_eval.py) and the testbed as an
lmms-eval task (testbed_task.py)."""
