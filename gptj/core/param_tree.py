"""Parameter trees by path: list, select, merge and match the leaves of nested dicts.

Parameters are nested dicts; a leaf's path is its keys joined by "/", e.g.
"blocks/attn/q_proj". Anything that is not a dict (an array, a
ShapeDtypeStruct, a flax-boxed leaf, a sharding) is a leaf. The Trainer uses
these to split trained from frozen parameters; LoRA, weight readers and the
recipes use them to join trees back together.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping


def param_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every leaf's path, in the tree's own (sorted-key) order."""
    paths = []
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}{key}"
        paths.extend(param_paths(value, path + "/") if isinstance(value, Mapping) else [path])
    return paths


def select_params(tree: Mapping[str, Any], keep: Callable[[str], bool], prefix: str = "") -> tuple[dict, dict]:
    """(the leaves whose path `keep` accepts, the rest), each a nested dict without empty branches."""
    kept, rest = {}, {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub_kept, sub_rest = select_params(value, keep, path + "/")
            if sub_kept:
                kept[key] = sub_kept
            if sub_rest:
                rest[key] = sub_rest
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def merge_params(*trees: Mapping[str, Any]) -> dict:
    """The union of nested dicts; a leaf present in several is taken from the last."""
    merged: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge_params(merged[key], value)
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


def path_matcher(trainable: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    """A predicate over parameter paths: a regular expression (full match), a predicate as is, None = all."""
    if trainable is None:
        return lambda path: True
    if callable(trainable):
        return trainable
    pattern = re.compile(trainable)
    return lambda path: pattern.fullmatch(path) is not None
