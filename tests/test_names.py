"""Hook names, written out by hand: the strings researchers type into ``fwd_hooks`` and cache lookups.

The model-level tests find out whether a hook fires at the name codi_lens builds; these fix the names
themselves, their defaults, their parsers and the errors for names that cannot exist.
"""

from __future__ import annotations

import pytest

from codi_lens.core.names import (
    act_name,
    parse_act_name,
    parse_thought_hook,
    position_axis,
    sae_hook_name,
    spans_every_cached_position,
    thought_hook_name,
)


def test_thought_hook_names_and_their_default_kind():
    assert thought_hook_name(3) == "thought.3.hook_hidden"
    assert thought_hook_name(0) == "thought.0.hook_hidden"
    assert thought_hook_name(1, "input") == "thought.1.hook_input"
    assert thought_hook_name(6, "projection") == "thought.6.hook_projection"
    for name in ("thought.3.hook_hidden", "thought.1.hook_input", "thought.12.hook_projection"):
        k, kind = parse_thought_hook(name)
        assert thought_hook_name(k, kind) == name
    assert parse_thought_hook("thought.3.hook_hidden") == (3, "hidden")
    for other in ("blocks.0.hook_resid_post", "thought.3.hook_hidden.hook_sae_acts_post", "thought.x.hook_input"):
        assert parse_thought_hook(other) is None


def test_impossible_thought_hooks_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"kind must be one of \('input', 'hidden', 'projection'\), got 'resid'"):
        thought_hook_name(2, "resid")
    with pytest.raises(ValueError, match=r"no 'input' hook at thought 0: inputs are k >= 1"):
        thought_hook_name(0, "input")
    with pytest.raises(ValueError, match=r"no 'hidden' hook at thought -1"):
        thought_hook_name(-1)


def test_sae_hook_names_default_to_the_feature_activations():
    assert sae_hook_name("thought.3.hook_hidden") == "thought.3.hook_hidden.hook_sae_acts_post"
    assert sae_hook_name("blocks.1.hook_resid_post", "recons") == "blocks.1.hook_resid_post.hook_sae_recons"


def test_block_names_round_trip_through_the_parser():
    assert act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert act_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert act_name("embed") == "hook_embed"
    assert parse_act_name("blocks.3.attn.hook_z") == (3, "z")
    assert parse_act_name("blocks.11.hook_resid_pre") == (11, "resid_pre")
    assert parse_act_name("hook_embed") is None
    assert parse_act_name("thought.3.hook_hidden") is None


def test_position_axes_of_each_kind_of_activation():
    assert position_axis("blocks.0.attn.hook_pattern") == 2  # [batch, head, query_pos, key_pos]
    assert position_axis("blocks.0.attn.hook_attn_scores") == 2
    assert position_axis("blocks.0.hook_resid_post") == 1
    assert position_axis("blocks.0.attn.hook_z") == 1
    assert position_axis("hook_embed") == 1
    assert position_axis("thought.2.hook_input") is None  # [batch, d_model]: one vector per step
    assert position_axis("prj.hook_out") is None
    assert spans_every_cached_position("blocks.1.attn.hook_rot_k")
    assert not spans_every_cached_position("blocks.1.attn.hook_k")
    assert not spans_every_cached_position("blocks.1.attn.hook_rot_q")
