"""Old import path of the method protocol: it lives in slimvlm.method now."""

from .method import (QUERIES, EncoderAttention, Method, PrefillLayer, PromptContext, Stage, check_budget,  # noqa: F401
                     check_ratio, query_index)
