"""Names of pytree leaves, as the rest of the library prints and matches them."""

from __future__ import annotations


def key_name(path, sep: str = "/") -> str:
    """'stem/conv/kernel' for a `jax.tree_util` key path (dict keys, attributes, indices)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return sep.join(parts)
