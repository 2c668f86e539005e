"""Mamba for JAX: the selective-scan op and a functional Mamba LM over plain pytrees."""

from ._pallas_tpu import PallasTpuScan as PallasTpuScan
from ._pallas_mosaic import PallasMosaicScan as PallasMosaicScan
from ._pallas_triton import PallasTritonScan as PallasTritonScan
from ._scan_associative import AssociativeScan as AssociativeScan
from ._scan_chunked import ChunkedScan as ChunkedScan
from ._scan_common import ScanArgs as ScanArgs
from ._scan_common import ScanImplementation as ScanImplementation
from ._scan_common import ScanSpec as ScanSpec
from ._scan_reference import ReferenceScan as ReferenceScan
from .conv import causal_conv1d as causal_conv1d
from .conv import causal_conv1d_update as causal_conv1d_update
from .scan import auto_implementation as auto_implementation
from .scan import implementations as implementations
from .scan import register_implementation as register_implementation
from .scan import selective_scan as selective_scan
from .sharding import TrainShardings as TrainShardings
from .sharding import batch_sharding as batch_sharding
from .sharding import make_mesh as make_mesh
from .sharding import optimizer_state_shardings as optimizer_state_shardings
from .sharding import param_shardings as param_shardings
from .sharding import ShardedScan as ShardedScan
from .sharding import sequence_parallel_forward as sequence_parallel_forward
from .sharding import sharded_selective_scan as sharded_selective_scan
from .sharding import train_shardings as train_shardings
from .state_update import selective_state_update as selective_state_update
from .state_update import selective_state_update_tokens as selective_state_update_tokens
from .tokenizer import ByteTokenizer as ByteTokenizer
from .training import TrainConfig as TrainConfig
from .training import train as train
from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import load_pretrained as load_pretrained
from .checkpoint import save_pretrained as save_pretrained
from .config import ConfigError as ConfigError
from .config import MambaConfig as MambaConfig
from .model import MambaCache as MambaCache
from .model import MixerState as MixerState
from .model import backbone as backbone
from .model import decode_step as decode_step
from .model import forward as forward
from .model import init_cache as init_cache
from .model import layer_params as layer_params
from .model import lm_head as lm_head
from .model import mixer as mixer
from .model import residual_block as residual_block
from .model import rms_norm as rms_norm
from .params import ParamsError as ParamsError
from .params import abstract_params as abstract_params
from .params import cast_params as cast_params
from .params import check_params as check_params
from .params import check_shapes as check_shapes
from .params import flatten as flatten
from .params import init_layer_params as init_layer_params
from .params import init_params as init_params
from .params import is_ssm_param as is_ssm_param
from .params import layer_shapes as layer_shapes
from .params import param_shapes as param_shapes
from .params import unflatten as unflatten
from .generation import GenerationOutput as GenerationOutput
from .generation import Sampling as Sampling
from .generation import generate as generate
from .generation import process_logits as process_logits
from .generation import sample_token as sample_token
from ._scan_recurrent import RecurrentScan as RecurrentScan

__version__ = "0.1.0"

__all__ = [
    "RecurrentScan",
    "TrainConfig",
    "train",
    "GenerationOutput",
    "Sampling",
    "generate",
    "process_logits",
    "sample_token",
    "CheckpointError",
    "load_pretrained",
    "save_pretrained",
    "ConfigError",
    "MambaConfig",
    "MambaCache",
    "MixerState",
    "backbone",
    "decode_step",
    "forward",
    "init_cache",
    "layer_params",
    "lm_head",
    "mixer",
    "residual_block",
    "rms_norm",
    "ParamsError",
    "abstract_params",
    "cast_params",
    "check_params",
    "check_shapes",
    "flatten",
    "init_layer_params",
    "init_params",
    "is_ssm_param",
    "layer_shapes",
    "param_shapes",
    "unflatten",
    "AssociativeScan",
    "ByteTokenizer",
    "ChunkedScan",
    "PallasTpuScan",
    "PallasMosaicScan",
    "PallasTritonScan",
    "ReferenceScan",
    "ScanArgs",
    "ScanImplementation",
    "ScanSpec",
    "auto_implementation",
    "causal_conv1d",
    "causal_conv1d_update",
    "implementations",
    "register_implementation",
    "selective_scan",
    "selective_state_update",
    "selective_state_update_tokens",
    "sharded_selective_scan",
    "TrainShardings",
    "batch_sharding",
    "make_mesh",
    "optimizer_state_shardings",
    "param_shardings",
    "sequence_parallel_forward",
    "ShardedScan",
    "train_shardings",
]
