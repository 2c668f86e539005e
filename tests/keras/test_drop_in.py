"""Drop-in: the Mamba mixer inside small Keras models (subclassed, and Sequential under a
mixed-precision policy) trained with fit on a toy sequence task; the loss goes down."""

from __future__ import annotations

import keras
import numpy as np
from mamba_keras import MambaMixer

from tests.keras.layer_test import keras_numpy_semantics

# the README example's mixer sizes (test_readme.py): the same compiled initialisation
VOCAB, HIDDEN = 12, 32


def _previous_token_task(examples=64, length=16, seed=0):
    """Predict the previous token (0 at the start): the mixer's causal conv solves it."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, (examples, length)).astype(np.int32)
    targets = np.concatenate([np.zeros((examples, 1), np.int32), inputs[:, :-1]], axis=1)
    return inputs, targets


class ToyModel(keras.Model):
    """Embedding, a residual Mamba mixer, a linear head: a subclassed Keras model."""

    def __init__(self, vocab_size, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Embedding(vocab_size, hidden_size)
        self.mixer = MambaMixer(hidden_size, state_size=8, seed=0)
        self.head = keras.layers.Dense(vocab_size)

    def call(self, ids):
        x = self.embed(ids)
        return self.head(x + self.mixer(x))


def _fit(model, epochs):
    inputs, targets = _previous_token_task()
    model.compile(optimizer=keras.optimizers.Adam(5e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with keras_numpy_semantics():
        history = model.fit(inputs, targets, batch_size=16, epochs=epochs, verbose=0)
    return history.history["loss"]


def test_subclassed_model_trains_with_fit():
    keras.utils.set_random_seed(0)
    losses = _fit(ToyModel(VOCAB, HIDDEN), epochs=8)
    assert np.isfinite(losses).all()
    assert losses[0] > 0.8 * np.log(VOCAB), losses  # starts untrained
    assert losses[-1] < 0.5 * losses[0], losses


def test_sequential_model_trains_under_mixed_bfloat16():
    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        mixer = MambaMixer(HIDDEN, state_size=8, seed=0)
        model = keras.Sequential([
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(VOCAB, HIDDEN),
            mixer,
            keras.layers.Dense(VOCAB, dtype="float32"),
        ])
        losses = _fit(model, epochs=8)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    assert mixer.compute_dtype == "bfloat16" and mixer.output.dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in mixer.weights)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses
