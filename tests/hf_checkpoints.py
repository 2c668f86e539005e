"""Random transformers `MambaForCausalLM` checkpoints for ground-truth tests.

`make_random_hf_checkpoint(path, **config_overrides)` builds a small model with
transformers' pure-PyTorch Mamba, perturbs every tensor (so that a swapped or
transposed weight changes the logits), makes its greedy generations diverse,
saves it with `save_pretrained` and returns the torch model. `save_original_format`
writes the same weights as an original state-spaces checkpoint (renamed keys,
original config.json, pytorch_model.bin).

Two traps such oracles fall into, handled here:
* A random model with tied embeddings mostly copies its input token, so a broken
  loader still passes a generation test. The mixers' out_proj and the final norm
  are scaled up until a 20-token greedy generation has at least 12 distinct tokens.
* `model.double()` is no float64 oracle: transformers still computes the residual,
  RMSNorm, A and D in float32. The tests compare float32 with float32.

Needs torch and transformers: import it only from tests marked `torch`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import MambaConfig, MambaForCausalLM

# Small but complete: every size differs from the others, so a transposed weight
# cannot keep its shape.
SMALL = dict(
    vocab_size=96,
    hidden_size=24,
    state_size=6,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    time_step_rank=5,
    use_bias=False,
    use_conv_bias=True,
    residual_in_fp32=True,
    tie_word_embeddings=True,
    layer_norm_epsilon=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

DIVERSE_TOKENS = 12
_PROMPT = [3, 17, 5, 40, 8]


def greedy_ids(model: MambaForCausalLM, prompt, n: int) -> np.ndarray:
    """Greedy continuation of `prompt` (batch, length) by `n` tokens, with transformers."""
    with torch.no_grad():
        ids = torch.as_tensor(np.array(prompt), dtype=torch.long)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id)
    return out[:, ids.shape[1]:].numpy()


def _perturb(model: MambaForCausalLM, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("A_log"):
                p.add_(0.3 * noise)
            elif name.endswith("bias"):
                p.add_(0.2 * noise)
            else:
                scale = p.std() if p.numel() > 1 and p.std() > 0 else 0.1
                p.add_(0.5 * scale * noise)


def make_random_hf_checkpoint(path, *, seed: int = 0, diverse: bool = True, **config_overrides):
    """Build, perturb and save a random MambaForCausalLM to `path`; return the model (eval).

    config_overrides replace entries of `SMALL` (transformers MambaConfig names).
    With diverse=True (default) the mixers' out_proj and the final norm are scaled
    by 1.5 until a 20-token greedy generation has >= 12 distinct tokens.
    """
    cfg = {**SMALL, **config_overrides}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**cfg)).eval()
    _perturb(model, gen)
    if diverse:
        for _ in range(12):
            if len(set(greedy_ids(model, [_PROMPT], 20)[0].tolist())) >= DIVERSE_TOKENS:
                break
            with torch.no_grad():
                for layer in model.backbone.layers:
                    layer.mixer.out_proj.weight.mul_(1.5)
                model.backbone.norm_f.weight.mul_(1.5)
        else:
            raise RuntimeError("could not make the random model's greedy generations diverse")
    model.save_pretrained(os.fspath(path))
    return model


def save_original_format(model: MambaForCausalLM, path, *, vocab_size: int | None = None,
                         pad_vocab_size_multiple: int = 8) -> None:
    """Write `model` as an original state-spaces checkpoint: config.json with d_model,
    n_layer, ssm_cfg, ...; pytorch_model.bin with `backbone.embedding.weight` and,
    as the original saves it, lm_head.weight even when tied.

    vocab_size: the unpadded vocabulary written to the config (default: the model's);
    the model's rows must equal it rounded up to pad_vocab_size_multiple.
    """
    c = model.config
    vocab = c.vocab_size if vocab_size is None else vocab_size
    padded = -(-vocab // pad_vocab_size_multiple) * pad_vocab_size_multiple
    if padded != c.vocab_size:
        raise ValueError(f"vocab_size {vocab} pads to {padded}, the model has {c.vocab_size} rows")
    os.makedirs(path, exist_ok=True)
    config = {
        "d_model": c.hidden_size,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab,
        "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "dt_rank": c.time_step_rank, "conv_bias": c.use_conv_bias, "bias": c.use_bias},
        "rms_norm": True,
        "residual_in_fp32": c.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_vocab_size_multiple,
        "tie_embeddings": c.tie_word_embeddings,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    state = {}
    for k, v in model.state_dict().items():
        state[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.clone()
    if c.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, os.path.join(path, "pytorch_model.bin"))


def hf_logits(model: MambaForCausalLM, input_ids, attention_mask=None) -> np.ndarray:
    """transformers' float32 logits (batch, length, vocab) for input_ids (batch, length)."""
    with torch.no_grad():
        ids = torch.as_tensor(np.array(input_ids), dtype=torch.long)
        am = None if attention_mask is None else torch.as_tensor(np.array(attention_mask))
        return model(ids, attention_mask=am, use_cache=False).logits.float().numpy()


# Named configurations used across the test modules; "odd" has every unusual choice.
VARIANTS = {
    "small": {},
    "odd": dict(use_bias=True, use_conv_bias=True, expand=3, conv_kernel=3, time_step_rank=7,
                tie_word_embeddings=False, vocab_size=93, num_hidden_layers=3),
    "fp16_residual": dict(residual_in_fp32=False, use_conv_bias=False, state_size=3,
                          hidden_size=20, time_step_rank=2),
}

_CACHE: dict[str, tuple[str, MambaForCausalLM]] = {}
_ROOT: list[str] = []


def cached_checkpoint(name: str) -> tuple[str, MambaForCausalLM]:
    """(folder, torch model) of VARIANTS[name], built once per test session."""
    if name not in _CACHE:
        if not _ROOT:
            import atexit
            import shutil
            import tempfile

            _ROOT.append(tempfile.mkdtemp(prefix="mamba-hf-"))
            atexit.register(shutil.rmtree, _ROOT[0], True)
        path = os.path.join(_ROOT[0], name)
        _CACHE[name] = (path, make_random_hf_checkpoint(path, seed=sorted(VARIANTS).index(name),
                                                          **VARIANTS[name]))
    return _CACHE[name]
