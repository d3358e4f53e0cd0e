"""The conversations one applied model serves: which KV cache holds which prompt's reduced sequence.

A cache slimvlm filled holds the reduced sequence (fewer visual tokens, stage 3-4's per-layer cuts); only its
Session knows where the next token sits and what each layer may attend to. Keyed by the cache itself (weakly: a
conversation ends when its cache is dropped), any later call that hands that cache back continues its Session:
generate()'s decode steps, and a follow-up turn of a multi-turn chat, also after other prompts were served in
between. A non-empty cache this handle did not fill (another model's, another apply()'s, a run without slimvlm)
holds a sequence whose frame slimvlm cannot know: it is refused.
"""

from __future__ import annotations

import weakref

from ..errors import SlimVLMError
from .session import Session


class Conversations:
    def __init__(self) -> None:
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._untouched: weakref.WeakSet = weakref.WeakSet()  # caches the untouched forward filled (text-only prompts)

    def started(self, session: Session) -> None:
        """A prefill filled session.cache (and was handed session.given_cache, where slimvlm swapped in its own)."""
        for cache in (session.cache, session.given_cache):
            if cache is not None:
                self._sessions[cache] = session

    def untouched(self, cache) -> None:
        """The untouched forward filled `cache` under this handle: its continuations run untouched."""
        if cache is not None:
            self._untouched.add(cache)

    def of(self, cache) -> Session | None:
        """The Session whose conversation `cache` holds; None for no cache, an empty one, or one the untouched
        forward filled here."""
        if cache is None:
            return None
        session = self._sessions.get(cache)
        if session is not None or cache in self._untouched or cache.get_seq_length() == 0:
            return session
        raise SlimVLMError(
            "this KV cache holds a conversation that was not started under this slimvlm handle (another model, "
            "another slimvlm.apply(), or a run without slimvlm), so its positions cannot be continued; start the "
            "conversation under this handle: generate() with the whole conversation, its images and no cache"
        )
