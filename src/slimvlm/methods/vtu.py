"""vtu: virtual token unmerging (VTU), the second half of DyMU (Wang et al., arXiv 2504.17040), stage 3.

After a stage-1 method merged tokens (tome, dymu:vtu=false), each LLM layer's attention runs as if they were
unmerged: a merged token's query and key are used once per patch it covers, each at that patch's position.
A runtime mode: this method asks for it (`virtual_unmerge`), runtime/unmerge.py does it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..method import BudgetSpec, Method, Stage
from ..registry import register
from .tome import ToMe

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter


@register
class VirtualUnmerge(Method):
    name = "vtu"
    description = "virtual token unmerging: LLM attention as if merged tokens were unmerged, via RoPE (DyMU)"
    stages = frozenset({Stage.PREFILL})
    virtual_unmerge = True

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        # a stage-3 companion of merging: the same merges, attended as unmerged
        return [ToMe.spec_for_budget(adapter, budget), "vtu"]
