"""The types plugins see: parameter models read a user's numbers strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from unmerge_core.types import PluginParams, StrictNumbers


class _Inner(StrictNumbers):  # a model nested in plugin params is strict when it derives StrictNumbers
    count: int = 1


class _Params(PluginParams):
    layers: int = Field(2, ge=1)
    strict: bool = False
    alpha: float = 0.5
    limit: int | None = None
    shape: tuple[int, int] = (1, 2)
    path: Path | None = None
    mode: Literal["a", "b"] = "a"
    inner: _Inner = _Inner()
    sizes: dict[str, list[int]] = Field(default_factory=dict)


@pytest.mark.parametrize("field,value", [
    ("layers", True), ("layers", 2.0), ("layers", "3"), ("strict", 1.0), ("strict", 1), ("strict", "yes"),
    ("alpha", True), ("limit", False), ("shape", [1, True]), ("inner", {"count": True}), ("sizes", {"x": [1, 2.0]}),
])
def test_a_bool_is_not_an_int_and_a_float_is_not_a_bool(field, value) -> None:
    """Hostile audit 20.22: ``skill-fdr.strict = 1.0`` and a layer count of ``true`` were coerced."""
    with pytest.raises(ValidationError):
        _Params.model_validate({field: value})


def test_what_toml_writes_is_still_read() -> None:
    params = _Params.model_validate({"layers": 3, "strict": True, "alpha": 1, "limit": None, "shape": [4, 5],
                                     "path": "x/y", "mode": "b", "inner": {"count": 2}, "sizes": {"x": [1]}})
    assert params.alpha == 1.0 and isinstance(params.alpha, float)  # a TOML integer for a float
    assert params.shape == (4, 5) and params.path == Path("x/y") and params.inner.count == 2
