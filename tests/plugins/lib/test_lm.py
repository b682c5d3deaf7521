"""``lib/lm``: the weight editor that causal verification edits a loaded model with."""

from __future__ import annotations

import torch

from unmerge_plugins.lib.lm import WeightEditor


def test_an_edit_is_undone_bit_for_bit() -> None:
    """Hostile audit 20.9: ``W − s·D + s·D`` is not ``W`` in floating point; a resumed run then scored on
    other weights than a clean one. Leaving the block restores the exact weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)).to(torch.float32)
    editor = WeightEditor(model, ["0", "1"])
    editor.set_module("0", torch.randn(48, 64) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for scale in (0.37, 1.3e-3, 0.51):
        with editor.edit({"0": torch.randn(48, 64), "1": torch.randn(32, 48)}, scale):
            assert not torch.equal(model[0].weight, before["0.weight"])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
