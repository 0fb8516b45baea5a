"""remat.policies: the Policy value, spec strings, registry and presets."""

from __future__ import annotations

import json
import re

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st
from vocab_layer import vocab_layer

import remat
from remat import policies
from remat.cli import main
from remat.policies import Policy, PolicySpecError, UnknownPolicyError, vocab
from remat.testing import assert_policy_parity, saved_names

Q, K, V, QKV = "query_proj", "key_proj", "value_proj", "qkv_proj"
CTX, OUT, WI, WI0, WI1, WO = "context", "out_proj", "mlpwi", "mlpwi_0", "mlpwi_1", "mlpwo"
QKV_ALL = {Q, K, V, QKV}
MINIMAL = QKV_ALL | {OUT, WI, WI0, WI1, WO}

# (save, offload, dots, offload_dots, remat), written out from MaxText's
# decoders.py, JAX's checkpoint_policies and Praxis's AutodiffCheckpointType,
# not computed from the presets module.
EXPECTED = {
    "none": (set(), set(), None, None, False),
    "full": (set(), set(), None, None, True),
    "everything_saveable": (set(), set(), None, None, True),  # JAX's policy under jax.checkpoint
    "nothing_saveable": (set(), set(), None, None, True),
    "dots_saveable": (set(), set(), "all", None, True),
    "dots_with_no_batch_dims_saveable": (set(), set(), "no_batch", None, True),
    "offload_dot_with_no_batch_dims": (set(), set(), None, "no_batch", True),
    "minimal": (MINIMAL, set(), None, None, True),
    "minimal_with_context": (MINIMAL | {CTX}, set(), None, None, True),
    "save_dot_with_context_except_mlp": (QKV_ALL | {CTX, OUT}, set(), None, None, True),
    "save_dot_except_mlpwi": (QKV_ALL | {OUT, WO}, set(), None, None, True),
    "save_dot_except_mlp": (QKV_ALL | {OUT}, set(), None, None, True),
    "save_qkv_proj": (QKV_ALL, set(), None, None, True),
    "save_out_proj": ({OUT}, set(), None, None, True),
    "qkv_proj_offloaded": (set(), {Q, K, V}, None, None, True),
    "minimal_offloaded": (set(), MINIMAL, None, None, True),
    "save_nothing": (set(), set(), None, None, True),
    "save_everything": (set(), set(), None, None, True),
    "save_qkv_out_proj": (QKV_ALL | {OUT}, set(), None, None, True),
    "save_context": ({CTX}, set(), None, None, True),
    "save_context_and_out_proj": ({CTX, OUT}, set(), None, None, True),
    "save_dot_only": (set(), set(), "all", None, True),
    "save_dot_with_no_batch_dim": (set(), set(), "no_batch", None, True),
    "save_iteration_input": ({"decoder_layer_input"}, set(), None, None, True),
    "selective": (MINIMAL | {CTX, "attn_norm", "mlp_norm"}, set(), None, None, True),
}
EVERYTHING = {"everything_saveable", "save_everything"}  # jax.checkpoint_policies.everything_saveable


def test_registry_matches_the_written_table():
    assert set(policies.names()) == set(EXPECTED)
    for name, (save, offload, dots, offload_dots, rem) in EXPECTED.items():
        assert policies.get(name) == Policy(save=save, offload=offload, dots=dots, offload_dots=offload_dots,
                                            remat=rem, everything=name in EVERYTHING), name
        assert policies.describe(name)


def test_none_and_full_are_distinct_values_not_python_none():
    none, full = policies.get("none"), policies.get("full")
    assert none != full and none.is_none and full.is_full
    assert str(none) == "none" and str(full) == "full"
    with pytest.raises(TypeError, match="for no remat write 'none'"):
        policies.get(None)  # type: ignore[arg-type]


def test_to_jax_uses_jax_hashable_objects_where_they_exist():
    cp = jax.checkpoint_policies
    assert policies.get("full").to_jax() is cp.nothing_saveable
    assert policies.get("dots_saveable").to_jax() is cp.dots_saveable
    assert policies.get("save_out_proj").to_jax() == cp.save_only_these_names("out_proj")
    # JAX's own object for names saved and offloaded; one object per Policy value (JAX caches on it)
    offloading = policies.get("minimal + offload:decoder_layer_input").to_jax()
    assert offloading.__qualname__.startswith("save_and_offload_only_these_names")
    assert offloading is policies.get("offload:decoder_layer_input + minimal").to_jax()
    assert policies.get("offload_dot_with_no_batch_dims").to_jax().__qualname__.startswith(
        "offload_dot_with_no_batch_dims")
    three_way = policies.get("save:out_proj + dots").to_jax()
    assert type(three_way).__name__ == "_ThreeWay"
    assert hash(three_way) == hash(policies.get("dots + save:out_proj").to_jax())


def test_spec_composition_and_canonical_string():
    p = policies.get("save:query_proj,key_proj + dots:no_batch")
    assert p == Policy(save={"query_proj", "key_proj"}, dots="no_batch")
    assert str(p) == "save:key_proj,query_proj + dots:no_batch"
    assert policies.get("minimal + offload:decoder_layer_input").offload == {"decoder_layer_input"}
    assert policies.get("save_qkv_proj + save_out_proj") == policies.get("save_dot_except_mlp")
    assert policies.get("dots:no_batch + dots") == Policy(dots="all")


names_st = st.sets(st.sampled_from(vocab.ALL_NAMES) | st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
                   max_size=5)


@st.composite
def policy_st(draw):
    if draw(st.booleans()) and draw(st.booleans()):
        return Policy(remat=False) if draw(st.booleans()) else Policy(everything=True)
    save = draw(names_st)
    offload = draw(names_st) - save
    dots = draw(st.sampled_from([None, "all", "no_batch"]))
    offload_dots = None if dots else draw(st.sampled_from([None, "all", "no_batch"]))
    return Policy(save=save, offload=offload, dots=dots, offload_dots=offload_dots)


@settings(deadline=None, max_examples=200)
@given(policy_st())
def test_spec_round_trip(p):
    assert policies.get(str(p)) == p
    assert hash(policies.get(str(p))) == hash(p)


def test_unknown_name_suggests_close_matches_and_lists_valid_names():
    with pytest.raises(UnknownPolicyError, match=r"unknown remat policy 'minmal' \(did you mean 'minimal'"
                                                 r"\?\); valid names: none, full, "):
        policies.get("minmal")
    with pytest.raises(ValueError, match="unknown remat policy 'qwerty'; valid names"):
        policies.describe("qwerty")


@pytest.mark.parametrize("spec, message", [
    ("save:a + sav:b", "bad term 'sav:b' at position 9 in spec 'save:a + sav:b': unknown key 'sav'"),
    ("minimal + ", "bad term '' at position 10 in spec 'minimal + ': empty term"),
    ("dots:some", "bad term 'dots:some' at position 0 in spec 'dots:some': unknown matmul rule 'some'"),
    ("save:a,,b", "bad term 'save:a,,b' at position 0 in spec 'save:a,,b': empty checkpoint name"),
    ("save", "bad term 'save' at position 0 in spec 'save': 'save' needs names"),
    ("Minimal!", "bad term 'Minimal!' at position 0 in spec 'Minimal!': expected a preset name"),
])
def test_bad_spec_terms_name_the_term_and_position(spec, message):
    with pytest.raises(PolicySpecError) as err:
        policies.get(spec)
    assert str(err.value).startswith(message)


def test_save_offload_overlap_is_an_error_naming_the_tag():
    with pytest.raises(ValueError, match="both saved and offloaded: mlpwo; a residual is either kept"):
        Policy(save={"mlpwo"}, offload={"mlpwo"})
    with pytest.raises(ValueError, match=r"term 'offload:mlpwo' at position 10: checkpoint name\(s\) both"):
        policies.get("minimal + offload:mlpwo")
    with pytest.raises(ValueError, match="the policy 'none' cannot be combined with 'full'"):
        policies.get("none + full")
    with pytest.raises(ValueError, match="matmul outputs both saved"):
        Policy(dots="all", offload_dots="no_batch")
    with pytest.raises(TypeError, match="got the string 'mlpwo'"):
        Policy(save="mlpwo")  # type: ignore[arg-type]


def test_register_rejects_duplicates_and_reserved_names(monkeypatch):
    from remat.policies import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the registry as it was
    with pytest.raises(ValueError, match="policy 'minimal' is already registered; pass overwrite=True"):
        policies.register("minimal", "full", doc="x")
    with pytest.raises(ValueError, match="invalid policy name 'save'"):
        policies.register("save", "full", doc="x")
    p = policies.register("my_test_policy", "save:mlpwo + offload:mlpwi", doc="For this test.")
    assert policies.get("my_test_policy + save:out_proj") == p | Policy(save={"out_proj"})


# -- what each preset keeps, by JAX's residual analysis --------------------------------
D = 8


def every_name(w, x):
    """The vocabulary layer's outputs summed (a scalar for gradients)."""
    return jnp.sin(vocab_layer(w, x)).sum()


ARGS = (jax.ShapeDtypeStruct((9, D, D), jnp.float32), jax.ShapeDtypeStruct((4, D), jnp.float32))


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items()
                                  if not e[2] and not e[3] and e[4] and n not in EVERYTHING])
def test_named_presets_keep_exactly_their_names(name):
    save, offload, *_ = EXPECTED[name]
    assert saved_names(every_name, name, *ARGS) == {"device": frozenset(save), "host": frozenset(offload)}


def test_full_keeps_no_checkpoint_name():
    assert saved_names(every_name, "full", *ARGS) == {"device": frozenset(), "host": frozenset()}


@pytest.mark.parametrize("policy", sorted({str(policies.get(n)) for n in policies.names()}))
def test_gradients_equal_plain_gradients_under_every_preset(policy):
    w = jax.random.normal(jax.random.key(0), ARGS[0].shape) / D
    x = jax.random.normal(jax.random.key(1), ARGS[1].shape)
    assert_policy_parity(every_name, policy, w, x)


def test_cli_policies_table_and_json(capsys):
    assert main(["policies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= set(EXPECTED)
    minimal = next(r for r in rows if r["name"] == "minimal")
    assert set(minimal["saves"]) == MINIMAL
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"minimal_offloaded", out) and "Korthikanti" in out


def test_package_exports():
    assert remat.policies is policies
    chex.assert_equal(sorted(remat.__all__), sorted(set(remat.__all__)))

