"""`mamba-train`: train a byte-level Mamba LM (see `mamba_ssm_core.training`).

    mamba-train --out checkpoints/bytes --steps 2000          # the Python standard library
    mamba-train --out checkpoints/mine --files notes/ '*.md'   # your own text files
    mamba-train --out checkpoints/bytes                       # resume where it stopped
    mamba-train --out checkpoints/big --mesh 2,2,2            # 8 devices: data, FSDP, tensor
    mamba-train --out checkpoints/long --seq-len 65536 --mesh 1,1,1,8   # 8 devices: sequence

Running it again with the same --out resumes from the checkpoint there, taking the
saved settings; flags given on the command line must agree with them, except the
logging, evaluation, saving, time-limit and --mesh flags.

--mesh DATA,FSDP,TENSOR[,SEQ] runs the step on a device mesh of those sizes (their
product is the device count): the batch splits over DATA x FSDP, FSDP shards
parameters and optimizer state, TENSOR splits the mixer's inner channels, SEQ splits
each window's length (`TrainConfig.mesh`).
--mesh none goes back to one device when resuming a run saved with a mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from . import training
from ._corpus import build_corpus, load_corpus, save_corpus
from .config import MambaConfig

_NO_MESH = "none"


def _mesh_arg(text: str) -> tuple[int, ...] | str:
    """--mesh DATA,FSDP,TENSOR[,SEQ] (e.g. 2,2,2 or 1,2,1,4), or "none"."""
    if text.strip().lower() == _NO_MESH:
        return _NO_MESH
    parts = text.split(",")
    try:
        sizes = tuple(int(x) for x in parts)
    except ValueError:
        sizes = ()
    if len(sizes) not in (3, 4) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected DATA,FSDP,TENSOR[,SEQ]: three or four integers >= 1 such as 2,2,2 or "
            f"1,2,1,4 (or none), got {text!r}")
    return sizes


_MODEL_FLAGS = {
    "hidden_size": 256, "num_hidden_layers": 6, "state_size": 16, "expand": 2, "conv_kernel": 4,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamba-train",
        description="Train a byte-level Mamba language model; checkpoints load with "
                    "load_pretrained, transformers and mamba-sample --model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="checkpoints/mamba-bytes",
                   help="checkpoint folder (resumed from if it holds one)")
    data = p.add_argument_group("data (default: this Python's standard library source)")
    src = data.add_mutually_exclusive_group()
    src.add_argument("--files", nargs="+", metavar="PATH",
                     help="text files, directories (every file below) or glob patterns")
    src.add_argument("--corpus", metavar="NPZ", help="a corpus written by --save-corpus")
    data.add_argument("--save-corpus", metavar="NPZ",
                      help="write the corpus (file list, bytes, split) here and continue")
    model = p.add_argument_group("model (new runs; a resumed run keeps its own)")
    for name, default in _MODEL_FLAGS.items():
        model.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                           help=f"default {default}")
    hp = p.add_argument_group("training (a resumed run keeps its own unless given)")
    defaults = training.TrainConfig()
    for f in dataclasses.fields(training.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "remat":
            hp.add_argument("--remat", dest="remat", action="store_true", default=None,
                            help=f"rematerialise each layer (default {default})")
            hp.add_argument("--no-remat", dest="remat", action="store_false")
        elif f.name == "mesh":
            hp.add_argument(flag, type=_mesh_arg, default=None, metavar="DATA,FSDP,TENSOR[,SEQ]",
                            help="device mesh sizes, product = device count, e.g. 2,2,2 or "
                                 "1,1,2,4 (SEQ splits each window's length; default: one "
                                 "device; none: one device on resumption)")
        elif f.name == "compute_dtype":
            hp.add_argument(flag, choices=["float32", "bfloat16"], default=None,
                            help=f"default {default}")
        else:
            kind = {int: int, float: float, str: str}.get(type(default), float)
            hp.add_argument(flag, type=kind, default=None, help=f"default {default}")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after that step (resumable later)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --out holds a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = pathlib.Path(args.out)
    resuming = training.has_checkpoint(out) and not args.no_resume

    given_model = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if resuming:
        model_config = MambaConfig.from_json_file(out / "config.json")
        saved = {"hidden_size": model_config.hidden_size,
                 "num_hidden_layers": model_config.num_hidden_layers,
                 "state_size": model_config.state_size, "expand": model_config.expand,
                 "conv_kernel": model_config.conv_kernel}
        clash = {k: (v, saved[k]) for k, v in given_model.items() if saved[k] != v}
        if clash:
            raise SystemExit(f"mamba-train: {out} holds a model with other sizes "
                             f"(given, saved): {clash}; use another --out or --no-resume")
        base = training.saved_train_config(out)
    else:
        model_config = training.byte_lm_config(**{**_MODEL_FLAGS, **given_model})
        base = training.TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(training.TrainConfig)
                 if getattr(args, f.name) is not None}
    if overrides.get("mesh") == _NO_MESH:
        overrides["mesh"] = None
    try:
        config = dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise SystemExit(f"mamba-train: {e}") from e

    if args.corpus:
        corpus = load_corpus(args.corpus)
    else:
        corpus = build_corpus(args.files)
    if args.save_corpus:
        save_corpus(corpus, args.save_corpus)
        print(f"corpus written to {args.save_corpus}: {len(corpus.names)} files, "
              f"{corpus.num_bytes:,} bytes ({corpus.source})", file=sys.stderr)
    try:
        result = training.train(model_config, config, out, corpus=corpus, resume=resuming,
                                stop_after=args.stop_after, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"mamba-train: {e}") from e
    evals = [r for r in result.log if "eval_bpb" in r]
    summary = f"step {result.step}/{config.steps}"
    if evals:
        summary += f", held-out {evals[-1]['eval_bpb']:.4f} bits/byte"
    print(f"{summary}; checkpoint in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
