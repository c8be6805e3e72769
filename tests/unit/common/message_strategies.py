"""Hypothesis strategies for every bus message, derived from the type hints."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import msgspec
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rlbus.codec import ALLOWED_DTYPES
from rlbus.messages import Message

TEXT = st.text(max_size=12)
ARRAY_DTYPES = st.sampled_from(sorted(ALLOWED_DTYPES))


def arrays() -> st.SearchStrategy[np.ndarray]:
    return ARRAY_DTYPES.flatmap(
        lambda dtype: hnp.arrays(
            dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            elements=_finite(dtype),
        )
    )


def _finite(dtype: str) -> st.SearchStrategy | None:
    # NaN != NaN would make round-trip equality meaningless; bytes are still compared exactly.
    return hnp.from_dtype(np.dtype(dtype), allow_nan=False) if dtype.startswith("float") else None


# Any-typed fields (``RunJoin.spec``) carry JSON-like data: scalars, lists and string-keyed maps.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


def for_type(annotation: Any) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return JSON_VALUES
    if annotation is np.ndarray:
        return arrays()
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return structs(annotation)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_type(a) for a in args))
    if origin is list:
        return st.lists(for_type(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(TEXT, for_type(args[1]), max_size=3)
    simple = {
        str: TEXT, bool: st.booleans(), type(None): st.none(),
        int: st.integers(-(2**63), 2**64 - 1), float: st.floats(allow_nan=False),
    }
    return simple[annotation]


def structs(cls: type[msgspec.Struct]) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = {f.name: for_type(hints[f.name]) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


def any_message(classes: tuple[type[Message], ...]) -> st.SearchStrategy[Message]:
    return st.one_of(*(structs(cls) for cls in classes))


def comparable(message: Message) -> Any:
    """Builtins form of a message with arrays as (dtype, shape, bytes) for exact equality."""

    def hook(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return (obj.dtype.name, list(obj.shape), obj.tobytes())
        raise TypeError(type(obj))

    return (type(message).__name__, msgspec.to_builtins(message, enc_hook=hook))
