"""`train` on a (data, fsdp, tensor[, seq]) device mesh (TrainConfig.mesh, mamba-train --mesh).

On the 8 virtual CPU devices of the root conftest: every layout gives the single-device
run's losses, gradient norms, held-out bits per byte, parameters and optimizer state
(float32, 1e-5 relative), with the parameters really laid out over the mesh; a run
resumes bit-identically on its mesh and to rounding on another; the errors name the
mesh and the argument.
"""

import json
import math

import jax
import numpy as np
import pytest
from mamba_ssm_core import _train_cli, make_mesh, train_shardings, training
from mamba_ssm_core._corpus import build_corpus, save_corpus
from mamba_ssm_core.checkpoint import load_pretrained
from mamba_ssm_core.sharding import batch_sharding

from tests import oracle
from tests.core.conftest import unhooked

TOL = 1e-5
MODEL = training.byte_lm_config(hidden_size=32, num_hidden_layers=2, state_size=4)  # I = 64
# Each layout compiles its own step and evaluation (seconds each, all of this file's time),
# so a layout whose every piece another one runs is no case of its own (test_sharding's
# train-step layouts also hold both parameter layouts to the single-device step):
# - data x FSDP, (2, 4, 1): (2, 2, 2) splits the batch over both axes (ShardedScan's
#   two-axis batch) and (1, 8, 1) shards every parameter over FSDP alone;
# - data alone, (8, 1, 1): (2, 1, 1, 4) keeps every parameter replicated, (2, 1, 4)
#   splits the batch (and evaluates) over "data" alone, (1, 8, 1) runs ShardedScan with
#   one batch axis and no channel axis, the batch in 8 shards.
LAYOUTS = [(2, 1, 4), (2, 2, 2), (1, 8, 1),
           # the sequence split too: seq_len 16 in shards of 4 and 8 steps
           (2, 1, 1, 4), (1, 2, 2, 2)]


def _config(mesh, **kw):
    base = dict(steps=3, batch_size=8, seq_len=16, learning_rate=1e-2, warmup_steps=1,
                eval_every=3, eval_tokens=256, save_every=3, log_every=1, seed=3, mesh=mesh)
    return training.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "src"
    root.mkdir()
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (root / f"m{i}.py").write_text(body)
    return build_corpus([root])


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """train(MODEL, _config(mesh)) into a fresh folder, once per mesh: (result, folder)."""
    done = {}

    def get(mesh):
        if mesh not in done:
            out = tmp_path_factory.mktemp("run")
            done[mesh] = training.train(MODEL, _config(mesh), out, corpus=corpus,
                                        progress=False), out
        return done[mesh]

    return get


def _records(log, key):
    return [r[key] for r in log if key in r]


def _assert_close(got, want, what):
    errors = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}{jax.tree_util.keystr(path)}"
        if np.issubdtype(b.dtype, np.floating) and np.abs(b).max() > 0:
            errors[jax.tree_util.keystr(path)] = oracle.rel_err(a, b)
        else:
            np.testing.assert_array_equal(a, b)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert errors and not bad, f"{what}: relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("mesh", LAYOUTS, ids=lambda m: "mesh " + ",".join(map(str, m)))
def test_every_layout_gives_the_single_device_run(run, mesh):
    (single, _), (sharded, out) = run(None), run(mesh)
    assert sharded.step == single.step == 3
    for key in ("loss", "grad_norm", "eval_bpb"):
        got, want = _records(sharded.log, key), _records(single.log, key)
        assert len(got) == len(want) > 0, key
        np.testing.assert_allclose(got, want, rtol=TOL, err_msg=key)
    _assert_close(sharded.params, single.params, "params")
    _assert_close(sharded.opt_state, single.opt_state, "opt_state")

    # The state really lives on the mesh, laid out by train_shardings (axes of size 1
    # left out), and FSDP x tensor split the largest weights.
    data, fsdp, tensor = mesh[:3]
    m = make_mesh(dict(zip(training.TrainConfig.MESH_AXES, mesh)))
    sh = train_shardings(m, single.params, single.opt_state,
                         data_axis="data" if data > 1 else None,
                         fsdp_axis="fsdp" if fsdp > 1 else None,
                         tensor_axis="tensor" if tensor > 1 else None)
    for got, want in ((sharded.params, sh.params), (sharded.opt_state, sh.opt_state)):
        for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
            assert len(a.sharding.device_set) == 8
    mixer = sharded.params["backbone"]["layers"]["mixer"]
    for name in ("in_proj", "out_proj"):
        w = mixer[name]["weight"]
        assert {x.data.size for x in w.addressable_shards} == {w.size // (fsdp * tensor)}, name
    if tensor > 1:
        assert mixer["A_log"].sharding.spec[1] == "tensor"

    # The checkpoint holds the gathered parameters, bit for bit.
    _, saved = load_pretrained(out)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_on_the_mesh_is_bit_identical(run, corpus, tmp_path):
    whole, whole_dir = run((2, 2, 2))
    first = training.train(MODEL, _config((2, 2, 2)), tmp_path, corpus=corpus, stop_after=2,
                           progress=False)
    assert first.step == 2 and training.saved_train_config(tmp_path).mesh == (2, 2, 2)
    rest = training.train(MODEL, _config((2, 2, 2)), tmp_path, corpus=corpus, progress=False)
    assert rest.step == 3
    for a, b in zip(jax.tree.leaves((whole.params, whole.opt_state)),
                    jax.tree.leaves((rest.params, rest.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ((whole_dir / "model.safetensors").read_bytes()
            == (tmp_path / "model.safetensors").read_bytes())
    assert _records(rest.log, "loss") == _records(whole.log, "loss")


def test_a_single_device_checkpoint_resumes_on_a_mesh(run, corpus, tmp_path):
    single, _ = run(None)
    training.train(MODEL, _config(None), tmp_path, corpus=corpus, stop_after=1, progress=False)
    rest = training.train(MODEL, _config((2, 1, 4)), tmp_path, corpus=corpus, progress=False)
    assert rest.step == 3
    assert training.saved_train_config(tmp_path).mesh == (2, 1, 4)
    np.testing.assert_allclose(_records(rest.log, "loss"), _records(single.log, "loss"),
                               rtol=TOL)
    _assert_close(rest.params, single.params, "params")
    _assert_close(rest.opt_state, single.opt_state, "opt_state")


def _unchecked_config(**kw):
    """TrainConfig(**kw) without the tests' jaxtyping/beartype wrapper, so that its own
    validation (what a user's plain call meets) runs."""
    config = object.__new__(training.TrainConfig)
    unhooked(training.TrainConfig.__init__)(config, **kw)
    return config


def test_mesh_errors_name_the_argument(corpus, tmp_path):
    for bad in ((2, 4), (8, 0, 1), (2.0, 2, 2), "2,2,2", (1, 1, 1, 2, 4)):
        with pytest.raises(ValueError, match=r"^TrainConfig: mesh must be None or three or four "
                                             r"integers >= 1 \(data, fsdp, tensor\[, seq\]\)"):
            _unchecked_config(mesh=bad)
    assert _unchecked_config(mesh=[2, 2, 2]).mesh == (2, 2, 2)
    assert _unchecked_config(mesh=[2, 1, 1, 4]).mesh == (2, 1, 1, 4)
    with pytest.raises(ValueError, match=r"^TrainConfig: seq_len must be divisible by the mesh's "
                                         r"seq = 4 sequence shards \(mesh=\(2, 1, 1, 4\)\), got 18"):
        training.TrainConfig(seq_len=18, mesh=(2, 1, 1, 4))
    with pytest.raises(ValueError, match=r"batch_size must be divisible by the mesh's data x "
                                         r"fsdp = 2 x 4 = 8 batch shards"):
        training.TrainConfig(batch_size=12, mesh=(2, 4, 1))
    assert training.TrainConfig.from_dict({"mesh": [2, 2, 2]}).mesh == (2, 2, 2)
    with pytest.raises(ValueError, match=r"^train: mesh=\(2, 2, 1\) \(data, fsdp, tensor\) makes "
                                         r"4 shards, but there are 8 cpu devices"):
        training.train(MODEL, _config((2, 2, 1)), tmp_path / "a", corpus=corpus, progress=False)
    odd = training.byte_lm_config(hidden_size=18, num_hidden_layers=1, state_size=4)  # I = 36
    with pytest.raises(ValueError, match=r"^train: mesh=\(1, 1, 8\) has tensor size 8, which "
                                         r"does not divide the model's 36 inner channels"):
        training.train(odd, _config((1, 1, 8)), tmp_path / "b", corpus=corpus, progress=False)
    with pytest.raises(ValueError, match=r"^train: mesh=\(1, 1, 1, 8\) splits seq_len 16 into 8 "
                                         r"shards of 2 steps, fewer than the conv's "
                                         r"conv_kernel - 1 = 3"):
        training.train(MODEL, _config((1, 1, 1, 8)), tmp_path / "c", corpus=corpus,
                       progress=False)
    with pytest.raises(ValueError, match=r"^train: mesh=\(1, 1, 2, 8\) \(data, fsdp, tensor, "
                                         r"seq\) makes 16 shards, but there are 8 cpu devices"):
        training.train(MODEL, _config((1, 1, 2, 8)), tmp_path / "c", corpus=corpus,
                       progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_cli_mesh_flag(corpus, tmp_path, capsys):
    save_corpus(corpus, tmp_path / "c.npz")
    out = tmp_path / "cli"
    # The settings of _config, so that the steps compiled for the layout tests are reused.
    args = ["--out", str(out), "--corpus", str(tmp_path / "c.npz"), "--hidden-size", "32",
            "--num-hidden-layers", "2", "--state-size", "4", "--steps", "3", "--batch-size", "8",
            "--seq-len", "16", "--learning-rate", "0.01", "--warmup-steps", "1", "--seed", "3",
            "--eval-every", "3", "--eval-tokens", "128", "--log-every", "1"]
    assert _train_cli.main([*args, "--mesh", "2,2,2", "--stop-after", "1"]) == 0
    err = capsys.readouterr().err
    assert "8 cpu devices, mesh data 2 x fsdp 2 x tensor 2" in err and "step 1/3" in err
    assert training.saved_train_config(out).mesh == (2, 2, 2)
    # Resuming keeps the saved mesh unless told otherwise; "none" goes back to one device.
    assert _train_cli.main(["--out", str(out), "--corpus", str(tmp_path / "c.npz"),
                            "--mesh", "none", "--quiet"]) == 0
    assert "step 3/3, held-out" in capsys.readouterr().err
    assert training.saved_train_config(out).mesh is None

    with pytest.raises(SystemExit, match=r"^mamba-train: train: mesh=\(4, 1, 1\) \(data, fsdp, "
                                         r"tensor\) makes 4 shards, but there are 8"):
        _train_cli.main(["--out", str(tmp_path / "other"), *args[2:], "--mesh", "4,1,1"])
    with pytest.raises(SystemExit, match=r"batch_size must be divisible by the mesh's data x "
                                         r"fsdp = 1 x 8 = 8"):
        _train_cli.main([*args, "--no-resume", "--batch-size", "4", "--mesh", "1,8,1"])
    for bad in ("2,2", "2,x,2", "0,8,1", "1,1,1,2,4"):
        with pytest.raises(SystemExit) as e:
            _train_cli.main([*args, "--mesh", bad])
        assert e.value.code == 2
        assert "expected DATA,FSDP,TENSOR[,SEQ]" in capsys.readouterr().err


def test_cli_mesh_flag_with_a_sequence_axis(run, corpus, tmp_path, capsys):
    """--mesh DATA,FSDP,TENSOR,SEQ trains with each window split over SEQ: the same
    first step as the layout test's run on that mesh (whose compiled step it reuses)."""
    whole, _ = run((2, 1, 1, 4))
    save_corpus(corpus, tmp_path / "c.npz")
    out = tmp_path / "cli"
    args = ["--out", str(out), "--corpus", str(tmp_path / "c.npz"), "--hidden-size", "32",
            "--num-hidden-layers", "2", "--state-size", "4", "--steps", "3", "--batch-size", "8",
            "--seq-len", "16", "--learning-rate", "0.01", "--warmup-steps", "1", "--seed", "3",
            "--eval-every", "3", "--eval-tokens", "256", "--log-every", "1", "--save-every", "3"]
    assert _train_cli.main([*args, "--mesh", "2,1,1,4", "--stop-after", "1"]) == 0
    err = capsys.readouterr().err
    assert "8 cpu devices, mesh data 2 x fsdp 1 x tensor 1 x seq 4" in err and "step 1/3" in err
    assert training.saved_train_config(out).mesh == (2, 1, 1, 4)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert _records(log, "loss") == _records(whole.log, "loss")[:1]
    with pytest.raises(SystemExit, match=r"seq_len must be divisible by the mesh's seq = 4 "
                                         r"sequence shards"):
        _train_cli.main([*args, "--no-resume", "--seq-len", "18", "--mesh", "2,1,1,4"])


def test_batch_placement_hands_each_device_its_rows():
    """_place_batch (make_array_from_process_local_data) puts the global batch's rows
    where the batch sharding says, replicated over the tensor axis."""
    m = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = batch_sharding(m, data_axis="data", fsdp_axis="fsdp")
    batch = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    placed = training._place_batch(batch, sh)
    assert placed.sharding == sh and placed.shape == (8, 5)
    np.testing.assert_array_equal(np.asarray(placed), batch)
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])
        assert shard.data.shape == (2, 5)
    assert math.prod(m.devices.shape) == len(placed.addressable_shards) == 8
