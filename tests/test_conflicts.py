"""The merge policy and the state checksum, as pure logic."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh._conflicts import FieldConflictError, merge_states, state_checksum

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
states = st.dictionaries(st.text(max_size=4), values, max_size=5)


@given(states, states)
def test_a_side_that_changed_nothing_takes_the_others_state(
    base: dict[str, Any], changed: dict[str, Any]
) -> None:
    assert merge_states(base, changed, base) == changed
    assert merge_states(base, base, changed) == changed


@given(states, states, states)
def test_merge_is_symmetric(
    base: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]
) -> None:
    try:
        forward = merge_states(base, ours, theirs)
    except FieldConflictError as exc:
        with pytest.raises(FieldConflictError) as caught:
            merge_states(base, theirs, ours)
        assert sorted(caught.value.fields) == sorted(exc.fields)
        return
    assert merge_states(base, theirs, ours) == forward


def test_fields_changed_by_both_sides_are_named() -> None:
    base = {"a": 1, "b": {"c": 1, "d": 1}, "e": 1}
    with pytest.raises(FieldConflictError) as caught:
        merge_states(base, {"a": 2, "b": {"c": 2, "d": 1}}, {"a": 3, "b": {"c": 3, "d": 2}})
    assert caught.value.fields == ["a", "b.c"]


def test_a_field_removed_by_one_side_and_kept_by_the_other_is_removed() -> None:
    assert merge_states({"a": 1, "b": 1}, {"b": 1}, {"a": 1, "b": 2}) == {"b": 2}


@given(states)
def test_the_checksum_does_not_depend_on_key_order(state: dict[str, Any]) -> None:
    reordered = dict(reversed(list(state.items())))
    assert state_checksum(reordered) == state_checksum(state)
