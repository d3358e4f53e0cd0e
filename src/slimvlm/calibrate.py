"""Old import path of DyMU's calibration: it lives beside the method now, in slimvlm.methods.dymu."""

from .methods.dymu.calibration import BatchLevelMerge, calibrate_dymu, summary, token_counts  # noqa: F401
from .methods.dymu.images import ImageFolder, calibration_scenes  # noqa: F401
from .methods.dymu.schedule import constant_schedule, schedule_for  # noqa: F401
from .methods.dymu.thresholds import (FACTS, FORMAT, RUNTIME_KEYS, SHIPPED, Thresholds, identity_of,  # noqa: F401
                                      shipped_thresholds)
