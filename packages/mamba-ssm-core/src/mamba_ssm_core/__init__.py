"""Mamba for JAX: the selective-scan op and a functional Mamba LM over plain pytrees."""

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
from .sharding import sharded_selective_scan as sharded_selective_scan
from .state_update import selective_state_update as selective_state_update
from .state_update import selective_state_update_tokens as selective_state_update_tokens
from .tokenizer import ByteTokenizer as ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "AssociativeScan",
    "ByteTokenizer",
    "ChunkedScan",
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
]
