"""The lab: the trainers, experiment runners and profiling scripts behind slimvlm's shipped weights
and measured numbers.

It is not part of the installed package: run it from the repository root, e.g.
``python -m experiments.testbed.train --out DIR``. The lab imports slimvlm; slimvlm never imports
the lab (tests/test_layout.py checks), so what the library needs lives in the library.

- ``testbed/``: the trainer of the shipped testbed model (``src/slimvlm/testbed/weights``).
- ``llava_mini.py``, ``dualspeed.py``: the LLaVA-Mini and DualSpeed experiments (results/).
- ``profiling/``: scripts that take a generate() call, a method or a training step apart.
"""
