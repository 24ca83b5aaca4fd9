"""String label columns as class ids that agree across splits.

``Dataset.class_encode_column`` numbers the classes of one split by their sorted names; a test split encoded on its
own would number them differently as soon as it lacks a class (and the CLI failed on string labels altogether).
:func:`encode_string_labels` encodes every split with the train split's names and refuses a label the train split
does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["encode_string_labels"]

_STRING_KINDS = ("string", "large_string")


def encode_string_labels(ds, column: str, names: Sequence[str] | None = None):
    """``ds`` with a string label ``column`` cast to ``ClassLabel`` (``names``, default the sorted distinct values);
    any other column is returned unchanged. A value missing from ``names`` raises ``ValueError`` naming it."""
    from datasets import ClassLabel, Value

    feature = ds.features[column]
    if not (isinstance(feature, Value) and feature.dtype in _STRING_KINDS):
        return ds
    values = ds.unique(column)
    if any(v is None for v in values):
        raise ValueError(f"label column {column!r} has missing values")
    names = sorted(values) if names is None else list(names)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"label column {column!r} holds {len(unknown)} label(s) the train split does not have, "
                         f"e.g. {unknown[:3]}")
    return ds.cast_column(column, ClassLabel(names=names))
