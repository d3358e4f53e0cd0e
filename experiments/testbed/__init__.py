"""The trainer of slimvlm's testbed VLM (the weights shipped in ``src/slimvlm/testbed/weights``,
trained by this code when it lived at ``slimvlm.testbed.train``).

Run it with ``python -m experiments.testbed.train --out DIR`` (:mod:`.train` says how). One job a
file, in the order a run meets them:

- ``config.py``: :class:`TrainConfig`, its flags and the command that reproduces a run;
- ``curriculum.py``, ``targets.py``, ``dataset.py``, ``loader.py``: the training batches (scenes
  growing harder, the auxiliary targets, the endless dataset, the DataLoader);
- ``losses.py``: the aux heads, the answer and auxiliary losses, guided attention;
- ``optimizer.py``: AdamW and the learning-rate schedule;
- ``loop.py``: the steps, within the wall-clock budget;
- ``heldout.py``: held-out accuracy while training;
- ``resume.py``: continuing a chain of runs (``--init``);
- ``outputs.py``, ``card.py``: the saved model, eval.json and the model card;
- ``train.py``: :func:`train`, which puts them together, and the command line.
"""
