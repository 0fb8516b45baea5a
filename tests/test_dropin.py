"""Where remat adds nothing, its wrappers behave as ``jax.checkpoint`` and
``nn.remat`` do: the same values, calling conventions, caching, errors and
tracebacks. Each test runs the original call as the control; the cases
follow JAX's own ``RematTest`` (tests/api_test.py) and Flax's
rematerialization tests (tests/linen/linen_transforms_test.py)."""

import functools
import os
import sysconfig
import traceback

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import remat
from remat import _compat

# -- JAX's RematTest cases, against remat.checkpoint ------------------------------------------------


def _wrappers():
    """The control and remat's wrappers, each ``wrap(f, **kw)``."""
    return {
        "jax.checkpoint": lambda f, **kw: jax.checkpoint(f, **kw),
        "remat full": lambda f, **kw: remat.checkpoint(f, "full", **kw),
        "remat dots": lambda f, **kw: remat.checkpoint(f, "dots", **kw),
    }


def _remat_cases(wrap):
    """JAX RematTest programs, with ``wrap`` in place of ``jax.checkpoint``: their values."""
    out = {}
    g = wrap(lambda x: (lax.sin(lax.sin(x)), 3.0))
    out["basic"] = g(2.0)[0]
    out["basic linearize"] = jax.linearize(lambda x: g(x)[0], 2.0)[1](3.0)
    y = 2 * jnp.sin(2.0)
    out["freevars"] = jax.grad(lambda x: wrap(lambda x: jnp.cos(x) * jnp.sin(y * x))(x))(2.0)
    h = wrap(lambda x: lax.sin(lax.sin(x)))
    out["jit grad"] = jax.jit(jax.grad(h))(2.0)
    xs = jnp.arange(3.0)
    out["vmap"] = jax.vmap(h)(xs)
    out["jacfwd"] = jax.jacfwd(h)(xs)
    out["jacrev"] = jax.jacrev(h)(xs)
    out["grad of grad"] = jax.grad(jax.grad(wrap(lambda x: lax.cos(lax.sin(x)))))(3.0)
    scanned = lambda x: lax.scan(wrap(lambda c, _: (jnp.sin(c), None)), x, jnp.arange(3.0))[0]
    out["scan body grad"] = jax.grad(scanned)(4.0)

    def binom(funs):
        if len(funs) == 1:
            return funs[0]
        f1, f2 = binom(funs[:len(funs) // 2]), binom(funs[len(funs) // 2:])
        return wrap(lambda x: f1(f2(x)))

    out["binomial nesting"] = jax.grad(binom([jnp.sin] * 4))(4.0)

    def move(r, i, dt=0.001):  # a default the caller never passes
        return r + dt * 5.0 * r, jnp.array([0.0])

    out["scan with defaults"] = jax.grad(
        lambda d: lax.scan(wrap(move), d * jnp.ones((5, 3)), jnp.arange(2))[0][0, 0])(5.0)
    out["no arguments under jit"] = jax.jit(lambda x: wrap(lambda: 2 * x)())(3.0)
    out["None argument"] = jax.grad(lambda x0: wrap(
        lambda x, _: lax.scan(lambda c, _: (c + 1, None), x, xs=None, length=1)[0])(x0, None))(1.0)

    def foo(state, dt=0.5, c=1):
        u, u_t = state
        return u, u_t + c**2 * u * dt

    out["nontrivial env"] = jax.grad(lambda u0: wrap(foo)((u0, jnp.zeros(())), 0.25, 2)[1])(1.0)
    return out


def test_jax_remat_cases_give_jax_checkpoint_values():
    wrappers = _wrappers()
    expected = _remat_cases(wrappers.pop("jax.checkpoint"))
    for name, wrap in wrappers.items():
        got = _remat_cases(wrap)
        for case in expected:
            chex.assert_trees_all_close(got[case], expected[case], rtol=1e-6,
                                        custom_message=f"{name}: {case}")


# -- calling, caching and failing as jax.checkpoint ---------------------------------------------------


def test_a_repeat_call_traces_nothing_new():
    traces = []

    def g(x, scale=1.0):
        traces.append(1)
        return jnp.sin(x) * scale

    def count(wrapped, *calls):
        traces.clear()
        for args, kwargs in calls:
            wrapped(*args, **kwargs)
        return len(traces)

    same = [((2.0,), {})] * 10
    assert count(jax.checkpoint(g), *same) == 1  # the control
    assert count(remat.checkpoint(g, "full"), *same) == 1
    static = [((2.0,), {"scale": 3.0})] * 10
    assert count(jax.checkpoint(g, static_argnums=(1,)), *[((2.0, 3.0), {})] * 10) == 1
    assert count(remat.checkpoint(g, "full", static_argnames="scale"), *static) == 1
    assert count(remat.checkpoint(g, "full", static_argnames="scale"),
                 ((2.0,), {"scale": 3.0}), ((2.0,), {"scale": 4.0}), ((2.0,), {"scale": 3.0})) == 2
    # A policy with names: the first call adds one trace for the name check, then none.
    tagged = lambda x: jnp.sin(checkpoint_name(x * 2.0, "h"))
    wrapped = remat.checkpoint(lambda x: (traces.append(1), tagged(x))[1], "save:h")
    traces.clear()
    for _ in range(10):
        jax.grad(wrapped)(2.0)
    first = len(traces)
    jax.grad(wrapped)(2.0)
    assert first <= 2 * 10 and len(traces) == first  # grad retraces its own input each call, as JAX does
    control = jax.checkpoint(lambda x: (traces.append(1), tagged(x))[1])
    traces.clear()
    for _ in range(10):
        jax.grad(control)(2.0)
    assert first == len(traces) + 1


def test_unpassed_defaults_stay_python_values():
    def f(x, apply_relu: bool = False):
        return jax.nn.relu(x) if apply_relu else x * 2.0

    x = jnp.arange(-2.0, 2.0)
    chex.assert_trees_all_close(remat.checkpoint(f, "full")(x), jax.checkpoint(f)(x))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x, apply_relu: bool = False):
            y = nn.Dense(3)(x)
            return nn.relu(y) if apply_relu else y

    key = jax.random.key(0)
    control = nn.remat(M)().init(key, x[None])
    got = remat.remat(M, "full")().init(key, x[None])
    chex.assert_trees_all_close(got, control)

    step = lambda c, x: (c + x, c * x)
    c, xs = jnp.float32(1.0), jnp.arange(3.0)
    chex.assert_trees_all_close(remat.checkpoint(functools.partial(lax.scan, step), "full")(c, xs),
                                jax.checkpoint(functools.partial(lax.scan, step))(c, xs))


def test_jax_error_classes_come_through_with_a_note():
    def f(x):
        if x > 0:
            return x
        return -x

    with pytest.raises(jax.errors.TracerBoolConversionError):  # the control
        jax.grad(jax.checkpoint(f))(1.0)
    with pytest.raises(jax.errors.TracerBoolConversionError) as e:
        jax.grad(remat.checkpoint(f, "full"))(1.0)
    assert e.value.__notes__[0] == (
        "remat: in function 'test_jax_error_classes_come_through_with_a_note.<locals>.f', the arguments x "
        "are traced; name the Python flags among them "
        "(e.g. deterministic) in static_argnames or static_argnums")
    assert "test_dropin.py" in str(traceback.extract_tb(e.value.__traceback__)[-1].filename)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        remat.checkpoint(lambda x: float(x), "full")(1.0)


def test_tracebacks_show_the_frames_jax_shows():
    def f(x):
        raise ValueError("boom")

    def frames(wrapped):
        with pytest.raises(ValueError, match="boom") as e:
            wrapped(1.0)
        return [fr.name for fr in traceback.extract_tb(e.value.__traceback__)]

    control = frames(jax.checkpoint(f))
    assert frames(remat.checkpoint(f, "full")) == control
    assert frames(remat.checkpoint(f, "save:h")) == control


def test_prevent_cse_per_argument():
    def layer(w, x):
        return jnp.tanh(x @ w)

    w, x = jnp.ones((3, 3)) * 0.1, jnp.ones((2, 3))

    def remat_eqn(wrapped):
        return next(e for e in jax.make_jaxpr(wrapped)(w, x).jaxpr.eqns if e.primitive.name == "remat2")

    control = jax.checkpoint(layer, prevent_cse=(False, True))
    got = remat.checkpoint(layer, "full", prevent_cse=(False, True))
    assert remat_eqn(got).params["prevent_cse"] == remat_eqn(control).params["prevent_cse"] == (False, True)
    grads = lambda f: jax.grad(lambda w, x: f(w, x).sum(), argnums=(0, 1))(w, x)
    chex.assert_trees_all_close(grads(got), grads(control))


def test_signatures_pass_through():
    chex.assert_trees_all_close(remat.checkpoint(jnp.sin, "full")(1.0), jax.checkpoint(jnp.sin)(1.0))

    def positional_only(x, /, y, *, scale):
        return x * y * scale

    def star_args(*xs, **kw):
        return sum(xs) * kw["k"]

    for fn, args, kwargs in [(positional_only, (2.0, 3.0), {"scale": 4.0}),
                             (star_args, (1.0, 2.0), {"k": 3.0})]:
        chex.assert_trees_all_close(remat.checkpoint(fn, "full")(*args, **kwargs),
                                    jax.checkpoint(fn)(*args, **kwargs))

    @jax.custom_vjp
    def sin(x):
        return jnp.sin(x)

    sin.defvjp(lambda x: (jnp.sin(x), checkpoint_name(jnp.cos(x), "cos")), lambda cos, g: (g * cos,))
    chex.assert_trees_all_close(jax.grad(remat.checkpoint(sin, "save:cos"))(1.0), jnp.cos(1.0))
    chex.assert_trees_all_close(jax.grad(remat.checkpoint(sin, "full"))(1.0), jnp.cos(1.0))


def test_static_argnums_as_jax_and_flax_number_them():
    def f(x, power):
        return x ** power if power > 1 else x

    control = jax.checkpoint(f, static_argnums=(1,))
    for wrapped in (remat.checkpoint(f, "full", static_argnums=1),
                    remat.checkpoint(f, "full", static_argnums=(-1,)),
                    remat.checkpoint(f, "full", static_argnames="power")):
        chex.assert_trees_all_close(jax.grad(wrapped)(3.0, 2), jax.grad(control)(3.0, 2))
    with pytest.raises(remat.RematError, match=r"its signature cannot be inspected, so static argument names "
                                               r"'x' cannot be resolved; give positions \(static_argnums\)"):
        remat.checkpoint(max, "full", static_argnames="x")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            y = nn.Dense(2)(x)
            return nn.Dropout(0.5, deterministic=not train)(y) if train else y

    x, key = jnp.ones((1, 2)), jax.random.key(0)
    control_vars = nn.remat(Block, static_argnums=(2,))().init(key, x, False)  # Flax: self is 0
    got_vars = remat.remat(Block, "full", static_argnums=(2,))().init(key, x, False)
    chex.assert_trees_all_close(got_vars, control_vars)
    with pytest.raises(remat.RematError, match="static_argnums counts self as argument 0"):
        remat.remat(Block, "full", static_argnums=(0,))


# -- what counts as the user's code -----------------------------------------------------------------


def test_user_code_is_decided_by_location_in_every_layout():
    """The in-interpreter layout (packages installed into the interpreter's
    own site-packages, under its stdlib folder) and a venv give the same answers."""
    layouts = {
        "in-interpreter": ("/py/lib/python3.11/", "/py/lib/python3.11/site-packages/"),
        "venv": ("/py/lib/python3.11/", "/venv/lib/python3.11/site-packages/"),
    }
    for stdlib, site in layouts.values():
        dirs = {"user": (site + "remat/models/",), "libraries": (site + "optax/", site + "remat/"),
                "stdlib": (stdlib,), "sites": (site,)}
        is_user = lambda f, d=dirs: _compat.is_user_file(f, **d)
        assert not is_user(site + "optax/losses/_classification.py")
        assert not is_user(site + "remat/_apply.py")
        assert is_user(site + "remat/models/transformer.py")
        assert is_user(site + "mypkg/train.py")
        assert not is_user(stdlib + "functools.py")
        assert is_user("/home/me/project/train.py")


def test_this_interpreter_finds_its_libraries():
    layout = _compat._layout()
    assert any(os.path.realpath(os.path.dirname(optax_file)) + os.sep == d
               for d in layout["libraries"] for optax_file in [__import__("optax").__file__])
    assert os.path.join(os.path.realpath(sysconfig.get_path("stdlib")), "") in layout["stdlib"]
    assert _compat._is_user(__file__)
    assert not _compat._is_user(remat._apply.__file__)


# -- Flax's rematerialization tests, against remat.remat ---------------------------------------------


def test_flax_remat_cases_give_nn_remat_values():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            for f in (3, 4, 5):
                x = nn.relu(nn.Dense(f)(x))
            return x

    x = jax.random.uniform(jax.random.key(1), (4, 4))
    variables = Mlp().init(jax.random.key(3), x)
    loss = lambda m: jax.grad(lambda v: m.apply(v, x).sum())(variables)
    chex.assert_trees_all_close(loss(remat.remat(Mlp, "full")()), loss(nn.remat(Mlp)()), loss(Mlp()))
    chex.assert_trees_all_close(remat.remat(Mlp, "dots")().apply(variables, x), Mlp().apply(variables, x))

    class ConditionalReLU(nn.Module):
        @nn.compact
        def __call__(self, inputs, apply_relu: bool = False):
            return nn.relu(inputs) if apply_relu else inputs

    x = -jnp.ones((4, 4))
    for wrapped in (nn.remat(ConditionalReLU)(), remat.remat(ConditionalReLU, "full")()):
        p = wrapped.init(jax.random.key(0), x)  # the unpassed default stays a Python value
        chex.assert_trees_all_close(wrapped.apply(p, x), x)
        with pytest.raises(jax.errors.TracerBoolConversionError):  # a passed flag is traced, as in Flax
            wrapped.apply(p, x, apply_relu=True)
    named = remat.remat(ConditionalReLU, "full", static_argnames="apply_relu")()
    p = named.init(jax.random.key(0), x)
    chex.assert_trees_all_close(jax.grad(lambda x: named.apply(p, x, apply_relu=True).sum())(x),
                                jnp.zeros_like(x))

    seen = []

    class Foo(nn.Module):
        @nn.compact
        def __call__(self, inputs, train: bool):
            seen.append(type(train) is bool)
            return nn.Dense(3, use_bias=False)(inputs)

    x = jnp.ones((1, 2))
    for argnums, static in (((2,), True), ((), False)):
        for wrapped in (nn.remat(Foo, static_argnums=argnums)(),
                        remat.remat(Foo, "full", static_argnums=argnums)()):
            seen.clear()
            wrapped.apply(wrapped.init(jax.random.key(0), x, True), x, False)
            assert seen and all(s == static for s in seen), (wrapped, argnums, seen)


# -- issue 24: JAX's policy objects and names, Flax module targets and state ---------------------------


def test_jax_policy_objects_and_callables_are_applied_unchanged():
    cp = jax.checkpoint_policies
    f = lambda x: jnp.sin(checkpoint_name(jnp.sin(x) * 2.0, "h"))
    custom = lambda prim, *_, **__: str(prim) == "sin"  # a predicate on primitives, as JAX's tests write
    for pol in (cp.dots_saveable, cp.save_only_these_names("h"), custom, cp.everything_saveable,
                cp.save_from_both_policies(cp.dots_saveable, cp.save_only_these_names("h"))):
        control = jax.grad(jax.checkpoint(f, policy=pol))(1.5)
        chex.assert_trees_all_close(jax.grad(remat.checkpoint(f, pol))(1.5), control)
        eqn = next(e for e in jax.make_jaxpr(remat.checkpoint(f, pol))(1.5).jaxpr.eqns
                   if e.primitive.name == "remat2")
        assert eqn.params["policy"] is pol  # applied unchanged
    x = jnp.ones((2, 3))

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(3)(x))

    v = M().init(jax.random.key(0), x)
    chex.assert_trees_all_close(remat.remat(M, cp.dots_saveable)().apply(v, x),
                                nn.remat(M, policy=cp.dots_saveable)().apply(v, x))
    stack = remat.scan_layers(M, num_layers=2, policy=custom)
    sv = stack().init(jax.random.key(0), x)
    assert stack().apply(sv, x).shape == x.shape


def test_jax_name_policies_are_checked_and_opaque_ones_get_a_note():
    cp = jax.checkpoint_policies
    f = lambda x: jnp.sin(checkpoint_name(jnp.sin(x), "h"))
    jax.grad(jax.checkpoint(f, policy=cp.save_only_these_names("typo")))(1.0)  # JAX: silently full
    for pol in (cp.save_only_these_names("typo"),
                cp.save_and_offload_only_these_names(names_which_can_be_saved=["typo"],
                                                     names_which_can_be_offloaded=[],
                                                     offload_src="device", offload_dst="pinned_host")):
        with pytest.raises(remat.MissingCheckpointNameError, match="typo"):
            jax.grad(remat.checkpoint(f, pol))(1.0)
    assert remat.policies.get(cp.save_only_these_names("h")).known
    opaque = remat.policies.get(lambda prim, *_, **__: False)
    assert not opaque.known
    report = remat.analyze(jax.grad(remat.checkpoint(f, opaque.fn)), 1.0, baseline=None)
    assert any("remat cannot see into" in n for n in report.notes), report.notes
    assert not any("cannot see into" in n for n in remat.analyze(
        jax.grad(remat.checkpoint(f, cp.save_only_these_names("h"))), 1.0, baseline=None).notes)


def test_a_callable_where_a_policy_must_be_text_says_so():
    cp = jax.checkpoint_policies
    with pytest.raises(remat.PolicyNotTextError, match="cannot be combined with '\\+'"):
        remat.policies.get(cp.dots_saveable) + remat.policies.get("full")
    with pytest.raises(TypeError, match="needs a policy as text"):
        remat.train.TrainConfig(policy=cp.dots_saveable)
    with pytest.raises(remat.RematError, match="SearchPoint.policy .* needs a policy as text"):
        remat.SearchPoint(policy=cp.dots_saveable)
    with pytest.raises(remat.PolicyNotTextError, match="register\\('mine'\\) needs a policy as text"):
        remat.policies.register("mine", cp.dots_saveable, doc="x")


def test_everything_saveable_is_jax_policy_under_checkpoint():
    none, every = remat.policies.get("none"), remat.policies.get("everything_saveable")
    assert every != none and str(every) == "everything_saveable" and not every.is_none
    assert remat.policies.get("save_everything") == every
    assert every + remat.policies.get("minimal") == every
    with pytest.raises(remat.RematError, match="'none' cannot be combined"):
        none + every
    with pytest.raises(remat.RematError, match="cannot be combined with the offloads"):
        remat.policies.get("everything_saveable + offload:h")
    # JAX's "excess precision" test: under jit, in bfloat16, the output equals the value inside the VJP
    @jax.custom_vjp
    def dot(x):
        return jnp.dot(x, x)

    dot.defvjp(lambda x: (dot(x), None), lambda _, g: (g,))

    @jax.custom_vjp
    def foo(x):
        return jnp.float32(1.0) * x.astype("float32")

    foo.defvjp(lambda x: (foo(x), x), lambda x, _: (jnp.float32(1.0) * x.astype("float32"),))
    x = (jnp.bfloat16(1) + jnp.finfo(jnp.bfloat16).eps) * jnp.eye(2, dtype=jnp.bfloat16)

    def forward_and_inside(wrap):
        y, vjp = jax.vjp(jax.jit(wrap(lambda x: foo(dot(x)))), x)
        return y, vjp(jnp.ones_like(y))[0]

    y, inside = forward_and_inside(lambda f: jax.checkpoint(f, policy=lambda *_, **__: True))  # the control
    chex.assert_trees_all_equal(y, inside.astype(y.dtype))
    for name in ("everything_saveable", "save_everything"):
        got_y, got_inside = forward_and_inside(lambda f, name=name: remat.checkpoint(f, name))
        chex.assert_trees_all_equal(got_y, y)
        chex.assert_trees_all_equal(got_inside, inside)
    eqns = jax.make_jaxpr(remat.checkpoint(jnp.sin, "everything_saveable"))(1.0).jaxpr.eqns
    assert [e.primitive.name for e in eqns] == ["remat2"]
    assert jax.make_jaxpr(remat.checkpoint(jnp.sin, "none"))(1.0).jaxpr.eqns[0].primitive.name == "sin"


def test_scan_layers_with_a_parameter_made_in_setup():
    class B(nn.Module):
        def setup(self):
            self.p = self.param("p", nn.initializers.ones, (1,))

        def __call__(self, x):
            return x * self.p

    x = jnp.ones((1,))
    stack = remat.scan_layers(B, num_layers=2, policy="full")
    v = stack().init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"p": (2, 1)}}  # a leading [num_layers] axis
    chex.assert_trees_all_close(stack().apply(v, x), x)


def test_nested_remat_runs_setup_once_as_nn_remat():
    seen = []

    class C(nn.Module):
        def setup(self):
            seen.append(self.scope.path)
            self.d = nn.Dense(2)

        def __call__(self, x):
            return self.d(x)

    def paths(cls):
        class P(nn.Module):
            @nn.compact
            def __call__(self, x):
                return cls(name="c")(x)

        seen.clear()
        x = jnp.ones((1, 2))
        P().apply(P().init(jax.random.key(0), x), x)
        return seen.count(("c",))

    control = paths(nn.remat(nn.remat(C)))
    assert paths(remat.remat(remat.remat(C, "full"), "dots")) == control == 2  # init and apply, once each


def test_wrong_targets_get_a_clear_error():
    import flax.errors
    from flax import nnx

    with pytest.raises(flax.errors.TransformTargetError):  # the control
        nn.remat(nn.Dense(2))
    with pytest.raises(flax.errors.TransformTargetError, match="an instance of Dense .* pass the class"):
        remat.remat(nn.Dense(2), "full")
    with pytest.raises(remat.RematTargetError, match="takes a linen nn.Module subclass"):
        remat.scan_layers(nn.Dense(2), num_layers=2)

    class Blk(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    b = Blk(nnx.Rngs(0))
    with pytest.raises(ValueError, match="bound methods"):  # the control
        nnx.remat(b.__call__)
    with pytest.raises(remat.RematTargetError, match="an instance of .*Blk"):
        remat.nnx.remat(b, "full")
    with pytest.raises(ValueError, match="the bound method .*Blk.__call__; pass the class"):
        remat.nnx.remat(b.__call__, "full")
    with pytest.raises(remat.RematTargetError, match="a linen module class; for linen use remat.remat"):
        remat.nnx.remat(nn.Dense, "full")
    with pytest.raises(remat.RematTargetError, match="for a function use remat.checkpoint"):
        remat.remat(jnp.sin, "full")


def test_nnx_plain_attribute_changes_are_written_back():
    from flax import nnx

    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.calls = 0

        def __call__(self, x):
            self.calls += 1
            return self.lin(x)

    x = jnp.ones((1, 2))
    control = Counting(nnx.Rngs(0))
    nnx.remat(lambda m, x: m(x), graph_updates=True)(control, x)
    nnx.remat(lambda m, x: m(x), graph_updates=True)(control, x)
    got = remat.nnx.remat(Counting, "full")(nnx.Rngs(0))
    got(x)
    got(x)
    assert got.calls == control.calls == 2

    class Leaky(Counting):
        def __call__(self, x):
            self.last = self.lin(x).sum()  # a traced array in a plain attribute
            return x

    with pytest.raises(remat.RematError, match="traced array to the plain Python attribute"):
        remat.nnx.remat(Leaky, "full")(nnx.Rngs(0))(x)
    stack = remat.nnx.scan_layers(Counting, num_layers=2)(rngs=nnx.Rngs(0))
    with pytest.raises(remat.RematError, match="block/calls"):
        stack(x)
