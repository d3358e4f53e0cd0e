"""DyMU (Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", arXiv 2504.17040):
the method and what it needs to run, in one place.

- method.py: the DyMU method (merging in the vision encoder, virtual unmerging in the LLM), its budget rule
- matching.py: DToMe's bipartite matching, every edge scored, merged above a threshold
- thresholds.py: calibrated thresholds as a file tied to its model; those a model folder ships
- schedule.py: how many tokens each encoder layer merges to reach a target
- calibration.py: the batch-level pass that finds the thresholds (`slimvlm calibrate`)
- images.py: the images it calibrates on: a folder, or testbed scenes
"""

from .calibration import calibrate_dymu, summary, token_counts  # noqa: F401
from .images import ImageFolder, calibration_scenes  # noqa: F401
from .matching import best_partners, merge_assign, threshold_merge  # noqa: F401
from .method import DyMU  # noqa: F401
from .schedule import schedule_for  # noqa: F401
from .thresholds import Thresholds, identity_of, shipped_thresholds  # noqa: F401
