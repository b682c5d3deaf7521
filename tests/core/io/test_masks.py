"""The check of a masker's returned mask: every wrong index or shape is one line naming the plugin and module."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_lora

from unmerge_core.errors import PluginError, UnmergeError
from unmerge_core.io.adapters import LoraAdapter
from unmerge_core.io.masks import check_mask, masked_vector
from unmerge_core.types import Mask

SHAPES = {"layers.0.q": (6, 8), "layers.0.k": (4, 8)}


@pytest.fixture
def adapters(tmp_path):
    return [LoraAdapter(write_lora(tmp_path / name, SHAPES, seed=i), name) for i, name in enumerate(("a", "b"))]


def test_a_good_mask_passes_as_int64(adapters) -> None:
    mask = check_mask(Mask({"layers.0.q": [0, 5, 47], "layers.0.k": np.array([3], dtype=np.int32)},
                           {"layers.0.q": (6, 8), "layers.0.k": (np.int64(4), np.int64(8))}), adapters, "m")
    assert all(v.dtype == np.int64 for v in mask.indices.values())
    assert mask.shapes == SHAPES and mask.size == 4
    assert all(type(n) is int for s in mask.shapes.values() for n in s)


@pytest.mark.parametrize("indices,shapes,expected", [
    ({"layers.0.q": np.array([-1, 2, 3])}, SHAPES, "module 'layers.0.q': index -1 is negative"),
    ({"layers.0.q": np.array([1, 1, 2])}, SHAPES, "module 'layers.0.q': index 1 is listed twice"),
    ({"layers.0.q": np.array([3, 1, 2])}, SHAPES, "module 'layers.0.q': indices are not in ascending order"),
    ({"layers.0.q": np.array([1.0, 2.0])}, SHAPES, "module 'layers.0.q': indices are float64, expected integers"),
    ({"layers.0.q": np.array([True, False])}, SHAPES, "module 'layers.0.q': indices are bool, expected integers"),
    ({"layers.0.q": np.array([[1, 2]])}, SHAPES, "module 'layers.0.q': indices have shape (1, 2), expected"),
    ({"layers.0.q": np.array([1, 48])}, SHAPES, "module 'layers.0.q': index 48 is out of range for its shape (6, 8)"),
    ({"layers.0.q": np.array([1])}, {"layers.0.q": (8, 6)},
     "module 'layers.0.q': shape (8, 6) contradicts the adapters' (6, 8) (adapter a)"),
    ({"layers.0.q": np.array([1])}, {}, "module 'layers.0.q': has no entry in the mask's shapes"),
    ({"layers.0.q": np.array([1])}, {"layers.0.q": (6, 8, 1)}, "module 'layers.0.q': shape (6, 8, 1) is not"),
    ({"layers.9.q": np.array([1])}, {"layers.9.q": (6, 8)}, "module 'layers.9.q': no dictionary adapter adapts it"),
    ({"layers.0.q\nx": np.array([1])}, {"layers.0.q\nx": (6, 8)}, "module 'layers.0.q\\nx': no dictionary adapter"),
])
def test_a_wrong_mask_is_refused_in_one_line_naming_plugin_and_module(adapters, indices, shapes, expected) -> None:
    with pytest.raises(PluginError) as info:
        check_mask(Mask(indices, shapes), adapters, "bad-masker")
    message = str(info.value)
    assert message.startswith("masker plugin 'bad-masker': ") and expected in message, message
    assert "\n" not in message
    assert info.value.stage == "masker" and info.value.plugin == "bad-masker"


@pytest.mark.parametrize("mask", [None, {"layers.0.q": [1]}, Mask({}, {}), Mask({"layers.0.q": []}, SHAPES)])
def test_not_a_mask_or_an_empty_one_is_refused(adapters, mask) -> None:
    with pytest.raises(PluginError, match="returned an empty mask or not a Mask"):
        check_mask(mask, adapters, "bad-masker")


def test_an_adapter_whose_module_shape_differs_from_the_masks_is_refused_naming_it(adapters, tmp_path) -> None:
    """Hostile audit 20.13: a variant with other module shapes, used as a constituent, ended in IndexError."""
    mask = check_mask(Mask({"layers.0.q": np.array([0, 40])}, {"layers.0.q": (6, 8)}), adapters, "m")
    other = LoraAdapter(write_lora(tmp_path / "other", {"layers.0.q": (8, 6)}), "a@other")
    with pytest.raises(UnmergeError) as info:
        masked_vector(other, mask)
    assert str(info.value) == (f"adapter a@other ({other.path}): module 'layers.0.q' has shape (8, 6), but the mask "
                               "(made from the dictionary adapters) has (6, 8): every adapter of a run must give a "
                               "module the dictionary's shape")
    assert masked_vector(adapters[1], mask).shape == (2,)
