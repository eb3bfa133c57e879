"""The flat core's old module paths (before issue 12) import the modules at their new homes."""

import importlib

import pytest

from lib_lightning.core._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_module_at_its_new_home(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_from_core_import_an_old_module_name():
    from lib_lightning.core import batch as nested
    from lib_lightning.core.lib import batch

    assert nested is batch


def test_a_name_that_never_existed_still_fails():
    with pytest.raises(ModuleNotFoundError, match="lib_lightning.core.no_such_module"):
        importlib.import_module("lib_lightning.core.no_such_module")
