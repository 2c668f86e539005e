"""The adapter selection (MAMBA_ADAPTERS) and the guard against weakened subclasses."""

from __future__ import annotations

import pathlib

import pytest

from tests.conformance.base import MambaConformanceTests, overridden_without_reason
from tests.conformance.selection import KNOWN_ADAPTERS, SelectionError, select_adapters


@pytest.fixture
def packages(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "mamba-ssm-core").mkdir()
    (tmp_path / "mamba-equinox").mkdir()
    (tmp_path / "mamba-keras").mkdir()
    return tmp_path


@pytest.mark.parametrize("value", [None, "", " , "])
def test_unset_or_empty_is_an_error(packages, value):
    with pytest.raises(SelectionError, match="not set"):
        select_adapters(value, packages)


def test_unknown_name_is_an_error(packages):
    with pytest.raises(SelectionError, match=r"unknown adapter\(s\) \['torch'\]"):
        select_adapters("equinox,torch", packages)


def test_known_name_without_package_is_an_error(packages):
    with pytest.raises(SelectionError, match="no package for \\['flax'\\]"):
        select_adapters("flax", packages)


def test_all_means_the_adapters_present(packages):
    assert select_adapters("all", packages) == ("equinox", "keras")
    (packages / "mamba-flax").mkdir()
    assert select_adapters(" all ", packages) == tuple(KNOWN_ADAPTERS)


def test_all_cannot_be_mixed_with_names(packages):
    with pytest.raises(SelectionError, match="cannot be combined"):
        select_adapters("all,equinox", packages)


def test_all_without_any_adapter_is_an_error(tmp_path):
    with pytest.raises(SelectionError, match="no adapter package"):
        select_adapters("all", tmp_path)


def test_names_are_deduplicated_in_order(packages):
    assert select_adapters("keras, equinox,keras", packages) == ("keras", "equinox")


# The guard: these subclasses are never collected (their names do not start with Test).


class _Faithful(MambaConformanceTests):
    adapter = "faithful"


class _Overrides(MambaConformanceTests):
    adapter = "overrides"

    def test_fresh_init_follows_the_official_init(self, *args, **kwargs):
        pass


class _XfailWithoutReason(MambaConformanceTests):
    adapter = "xfail-no-reason"

    @pytest.mark.xfail
    def test_fresh_init_follows_the_official_init(self, *args, **kwargs):
        pass


class _XfailWithReason(MambaConformanceTests):
    adapter = "xfail-reason"

    @pytest.mark.xfail(reason="this framework cannot do X")
    def test_fresh_init_follows_the_official_init(self, *args, **kwargs):
        pass


class _Deletes(MambaConformanceTests):
    adapter = "deletes"

    test_fresh_init_follows_the_official_init = None


def test_guard_accepts_an_untouched_subclass():
    assert overridden_without_reason(_Faithful) == []


def test_guard_rejects_an_override():
    assert overridden_without_reason(_Overrides) == [
        "test_fresh_init_follows_the_official_init: overridden without "
        "@pytest.mark.xfail(reason=...)"
    ]


def test_guard_rejects_an_xfail_without_reason():
    assert overridden_without_reason(_XfailWithoutReason) == [
        "test_fresh_init_follows_the_official_init: overridden without "
        "@pytest.mark.xfail(reason=...)"
    ]


def test_guard_accepts_an_xfail_with_reason():
    assert overridden_without_reason(_XfailWithReason) == []


def test_guard_rejects_a_deletion():
    assert overridden_without_reason(_Deletes) == [
        "test_fresh_init_follows_the_official_init: deleted (not a test function)"
    ]
