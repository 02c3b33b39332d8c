"""Text statistics of each page: the demo's CPU-bound step.

``POLITE_PROCESS_FUNCTION`` points here, so scrapy-polite's process pipeline
runs :func:`text_stats` in worker processes: it gets an item's fields as a dict
and returns them with the statistics added. The MinHash signature (the work
that costs) lets a later step find near-duplicate pages: two pages share about
as many signature values as they share three-word phrases.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from typing import Any

_WORD = re.compile(r"[^\W\d_]+")
# fmt: off
_STOP_WORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from",
    "in", "is", "it", "of", "on", "or", "the", "to", "with",
})
# fmt: on
_PRIME = (1 << 61) - 1
_PERMUTATIONS = tuple(
    (rng.randrange(1, _PRIME), rng.randrange(_PRIME))
    for rng in [random.Random(9309)]
    for _ in range(64)
)


def text_stats(item: dict[str, Any]) -> dict[str, Any]:
    text = item.get("text") or ""
    words = [word.lower() for word in _WORD.findall(text)]
    counts = Counter(word for word in words if word not in _STOP_WORDS)
    shingles = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    item.update(
        word_count=len(words),
        unique_words=len(set(words)),
        top_words=[word for word, _ in counts.most_common(5)],
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        minhash=_minhash(shingles),
    )
    return item


def _minhash(shingles: set[str]) -> list[int]:
    """64 minima of random linear hashes over the page's three-word phrases."""
    if not shingles:
        return []
    hashes = [
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") for s in shingles
    ]
    return [min((a * h + b) % _PRIME for h in hashes) for a, b in _PERMUTATIONS]
