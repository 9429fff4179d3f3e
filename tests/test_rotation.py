import importlib

import pytest
import torch

from lengthwise.models import compat
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.rotation import rotate, rotation_angles
from lengthwise.testing import ROPE_FAMILIES, tiny_model


def _reference_rotation(model, x, positions):
    """The family's own rotary code applied to x (1, H, T, head_dim)."""
    family = model.config.model_type
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family == "gptj":
        attn = model.transformer.h[0].attn
        if (shared := compat.gptj_rotary_table(model)) is not None:  # transformers >= 5.24
            sin, cos = shared(x, positions)  # 2 x (1, T, rotary_dim/2)
        else:
            table = compat.gptj_layer_table(attn, positions)  # (1, max_pos, rotary_dim)
            sincos = table[0, positions[0]][None]  # (1, T, rotary_dim)
            sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        x = x.transpose(1, 2)  # GPT-J rotates (B, T, H, D)
        rot = modeling.apply_rotary_pos_emb(x[..., : attn.rotary_dim], sin, cos)
        return torch.cat([rot, x[..., attn.rotary_dim :]], -1).transpose(1, 2)
    cos, sin = rotary_layout(model).rotary_module(x, positions)
    return modeling.apply_rotary_pos_emb(x, x, cos, sin)[0]


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_rotate_matches_the_family_and_composes(family):
    model = tiny_model(family)
    layout = rotary_layout(model)
    positions = torch.arange(5, 25)[None]
    x = torch.randn(1, 2, 20, layout.head_dim)
    ours = rotate(x, rotation_angles(positions, layout.inv_freq), layout.style)
    torch.testing.assert_close(ours, _reference_rotation(model, x, positions), rtol=1e-5, atol=1e-5)
    # group action: rotating by the negative angles undoes the rotation
    back = rotate(ours, -rotation_angles(positions, layout.inv_freq), layout.style)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
