"""The LM with its sequence split over mesh axes, on 8 virtual CPU devices.

`sequence_parallel_forward` (and `model.mixer(..., sequence_axis=)` inside a user's
shard_map) against the single-device model: logits, the cross-entropy and the
gradient of every parameter (float32, 1e-5 relative), with the sequence alone or
combined with data and tensor axes, over two mesh axes, conv kernels 3 and 4 and
configs with and without the conv and linear biases; a warm cache, left padding and
inputs_embeds; with `ShardedScan` running each device's block of the scan inside;
and the errors for bad splits and axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mamba_ssm_core import (
    MambaCache,
    MambaConfig,
    MixerState,
    ShardedScan,
    forward,
    init_cache,
    layer_params,
    make_mesh,
    mixer,
    param_shardings,
    sequence_parallel_forward,
)

from tests import oracle
from tests.core.conftest import init_params_at, unhooked
from tests.random_inputs import normal

TOL = 1e-5
BATCH, LENGTH = 4, 32

CONFIGS = {
    # conv_kernel 4, every bias, untied head, float32 residual
    "k4": MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=4, time_step_rank=2, use_bias=True, use_conv_bias=True,
        layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False),
    # conv_kernel 3, no biases, tied head, residual in the compute dtype
    "k3": MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=3, time_step_rank=3, use_bias=False, use_conv_bias=False,
        layer_norm_epsilon=1e-5, residual_in_fp32=False, tie_word_embeddings=True),
}
# name: (mesh axes, sequence_parallel_forward axes, param_shardings axes or None)
LAYOUTS = {
    "seq 8": ({"seq": 8}, dict(sequence_axis="seq"), None),
    "data 2 x seq 4": ({"data": 2, "seq": 4}, dict(sequence_axis="seq", batch_axis="data"), None),
    # tensor and data stay with XLA's partitioner; the parameters are split over tensor
    "data 2 x tensor 2 x seq 2": (
        {"data": 2, "tensor": 2, "seq": 2}, dict(sequence_axis="seq"),
        dict(data_axis="data", tensor_axis="tensor")),
    # ... with the scan run on each device's block of batch and channels (ShardedScan)
    "data 2 x tensor 2 x seq 2, ShardedScan": (
        {"data": 2, "tensor": 2, "seq": 2}, dict(sequence_axis="seq"),
        dict(data_axis="data", tensor_axis="tensor")),
    "seq over 2 axes": (
        {"data": 2, "s1": 2, "s2": 2}, dict(sequence_axis=("s1", "s2"), batch_axis="data"), None),
}
CASES = [("k4", name) for name in LAYOUTS] + [("k3", "data 2 x tensor 2 x seq 2, ShardedScan")]


def _tokens(config, seed, batch=BATCH, length=LENGTH):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, config.vocab_size, (batch, length + 1)), jnp.int32)


def _loss_fn(logits_fn):
    def loss(params, tokens):
        logits = logits_fn(params, tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.mean(nll), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def single_device():
    """(params, tokens, (loss, logits), grads) of the unsplit model, per config."""
    done = {}

    def get(name):
        if name not in done:
            config = CONFIGS[name]
            params = init_params_at(7, config)
            tokens = _tokens(config, 1)
            step = _loss_fn(lambda p, ids: forward(p, config, ids))
            done[name] = (params, tokens, *step(params, tokens))
        return done[name]

    return get


def _errors(got, want, prefix):
    out = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(path)
        out[prefix + jax.tree_util.keystr(path)] = oracle.rel_err(a, b)
    return out


@pytest.mark.parametrize(("config_name", "layout"), CASES, ids=[f"{c}-{l}" for c, l in CASES])
def test_logits_loss_and_gradients_match_one_device(single_device, config_name, layout):
    config = CONFIGS[config_name]
    params, tokens, (loss0, logits0), grads0 = single_device(config_name)
    axes, kw, param_axes = LAYOUTS[layout]
    mesh = make_mesh(axes)
    if param_axes is not None:
        params = jax.device_put(params, param_shardings(params, mesh, **param_axes))
        tokens = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))
    if layout.endswith("ShardedScan"):
        kw = dict(kw, impl=ShardedScan(mesh, batch_axis="data", channel_axis="tensor"))
    step = _loss_fn(lambda p, ids: sequence_parallel_forward(p, config, ids, mesh=mesh, **kw))
    (loss, logits), grads = step(params, tokens)

    # The logits stay split: over the sequence axes, and the batch over "data" (manual,
    # or in the third layout, the tokens' layout propagated by XLA).
    batch = kw.get("batch_axis", "data" if param_axes else None)
    assert logits.sharding.spec[:2] == (batch, kw["sequence_axis"]), logits.sharding
    errors = {"loss": oracle.rel_err(loss, loss0), "logits": oracle.rel_err(logits, logits0)}
    errors |= _errors(grads, grads0, "grad")
    assert len(errors) == 2 + len(jax.tree.leaves(params))
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def _warm_cache(config, batch, seed):
    """A cache with random (never zero) conv and SSM states."""
    c = init_cache(config, batch)
    return MambaCache(*normal(seed, c.conv_state.shape, c.ssm_state.shape))


def test_warm_cache_mask_and_embeds():
    """A prefill continuing a random cache, with left padding, returns the unsplit
    forward's logits and cache (conv state from the last shard, SSM state folded over
    all of them); inputs_embeds gives the same as the ids."""
    config = CONFIGS["k4"]
    params = init_params_at(3, config)
    ids = _tokens(config, 2)[:, :-1]
    cache = _warm_cache(config, BATCH, 4)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, :5] = False  # padding ending inside the first shard
    mask[2, :12] = False  # padding over the first shard and into the second
    mask = jnp.asarray(mask)
    want = jax.jit(lambda p, i, c, m: forward(p, config, i, cache=c, mask=m))(params, ids, cache,
                                                                              mask)
    mesh = make_mesh({"data": 2, "seq": 4})
    got = jax.jit(lambda p, i, c, m: sequence_parallel_forward(
        p, config, i, mesh=mesh, sequence_axis="seq", batch_axis="data", cache=c, mask=m))(
            params, ids, cache, mask)
    embeds = jnp.take(params["backbone"]["embeddings"]["weight"], ids, axis=0)
    from_embeds = jax.jit(lambda p, e, c, m: sequence_parallel_forward(
        p, config, mesh=mesh, sequence_axis="seq", inputs_embeds=e, cache=c, mask=m))(
            params, embeds, cache, mask)
    assert isinstance(got[1], MambaCache)
    errors = _errors(got, want, "ids") | _errors(from_embeds, want, "embeds")
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert len(errors) == 6 and not bad, f"relative errors above {TOL}: {bad}"


def test_mixer_inside_a_users_shard_map():
    """`mixer(..., sequence_axis=)` in one's own shard_map: output and the returned state
    of the whole sequence equal the unsplit mixer's."""
    config = CONFIGS["k3"]
    layer = layer_params(init_params_at(5, config), 0)["mixer"]
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, config.hidden_size)), jnp.float32)
    cache = _warm_cache(config, BATCH, 7)
    state = MixerState(cache.conv_state[0], cache.ssm_state[0])
    want = jax.jit(lambda x, s: mixer(layer, config, x, state=s))(x, state)

    mesh = make_mesh({"rows": 2, "seq": 4})
    spec_x = P("rows", "seq", None)
    spec_s = MixerState(P("rows", None, None), P("rows", None, None))
    body = jax.shard_map(
        lambda x, s: mixer(layer, config, x, state=s, sequence_axis="seq"), mesh=mesh,
        in_specs=(spec_x, spec_s), out_specs=(spec_x, spec_s), check_vma=False)
    got = jax.jit(body)(x, state)
    errors = _errors(got, want, "")
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert len(errors) == 3 and not bad, f"relative errors above {TOL}: {bad}"


def test_bad_splits_and_axes_raise():
    config = CONFIGS["k4"]
    params = init_params_at(0, config)
    ids = _tokens(config, 0, length=30)[:, :-1]  # (4, 30)
    mesh = make_mesh({"data": 2, "seq": 4})
    spf = unhooked(sequence_parallel_forward)

    def raises(match, **kw):
        with pytest.raises(ValueError, match=match):
            spf(params, config, kw.pop("ids", ids), mesh=kw.pop("mesh", mesh), **kw)

    raises(r"^sequence_parallel_forward: length \(30\) must be divisible by the 4 shards of "
           r"sequence_axis='seq'", sequence_axis="seq")
    raises(r"sequence_axis='nope' names no axis of the mesh; its axes are \('data', 'seq'\)",
           sequence_axis="nope")
    raises(r"the axis arguments must use distinct mesh axes", sequence_axis="seq",
           batch_axis="seq")
    raises(r"sequence_axis must name one or more mesh axes, got None", sequence_axis=None)
    raises(r"each of the 8 shards of sequence_axis=\('data', 'seq'\) must hold at least "
           r"conv_kernel - 1 = 3 steps, got length 16 / 8 = 2", ids=ids[:, :16],
           sequence_axis=("data", "seq"))
    raises(r"batch \(3\) must be divisible by the 2 shards of batch_axis='data'", ids=ids[:3, :16],
           sequence_axis="seq", batch_axis="data")
    raises(r"input_ids must lie in \[0, vocab_size=64\)", ids=ids[:, :16] + 64,
           sequence_axis="seq")
    explicit = jax.make_mesh((2, 4), ("data", "seq"),
                             axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    raises(r"mesh axes \['seq'\] are Explicit", ids=ids[:, :16], mesh=explicit,
           sequence_axis="seq")

    # mixer with a sequence axis that no enclosing shard_map makes manual
    x = jnp.ones((2, 8, config.hidden_size), jnp.float32)
    layer = layer_params(params, 0)["mixer"]
    unbound = r"^mixer: sequence_axis='seq': 'seq' is not a manual mesh axis here"
    with pytest.raises(ValueError, match=unbound):
        mixer(layer, config, x, sequence_axis="seq")
    body = jax.shard_map(lambda x: mixer(layer, config, x, sequence_axis="seq")[0], mesh=mesh,
                         in_specs=P(None, "data", None), out_specs=P(None, "data", None),
                         axis_names=frozenset({"data"}), check_vma=False)
    with pytest.raises(ValueError, match=unbound):
        jax.jit(body)(x)
    with pytest.raises(TypeError, match=r"^mixer: sequence_axis must be a mesh axis name or a "
                                        r"tuple of them, got \['seq'\]"):
        unhooked(mixer)(layer, config, x, sequence_axis=["seq"])
    short = jax.shard_map(lambda x: mixer(layer, config, x, sequence_axis="seq")[0], mesh=mesh,
                          in_specs=P(None, "seq", None), out_specs=P(None, "seq", None),
                          check_vma=False)
    with pytest.raises(ValueError, match=r"^mixer: each sequence shard must hold at least "
                                         r"conv_kernel - 1 = 3 steps, got 2 \(4 shards"):
        jax.jit(short)(x)


def test_one_shard_is_the_plain_model():
    """A sequence axis of size 1 splits nothing: the plain model's program and result."""
    config = CONFIGS["k4"]  # (its init_params program is compiled for the tests above)
    params = init_params_at(1, config)
    ids = _tokens(config, 3, batch=8, length=8)[:, :-1]
    mesh = make_mesh({"data": 8, "seq": 1})
    got = jax.jit(lambda p, i: sequence_parallel_forward(
        p, config, i, mesh=mesh, sequence_axis="seq", batch_axis="data"))(params, ids)
    want = jax.jit(lambda p, i: forward(p, config, i))(params, ids)
    assert oracle.rel_err(got, want) <= 1e-6
