"""fastcodec: EnCodec with fused kernels behind a faithful PyTorch reference.

``from fastcodec import ResidualVectorQuantizer`` is a drop-in for audiocraft's; the faithful
reference of the whole codec is ``fastcodec.reference``.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401
from ._backend import BackendUnavailableError, backends  # noqa: E402,F401
from ._devcheck import check_errors  # noqa: E402,F401
from ._pool import release_pools  # noqa: E402,F401
from .checkpoint import CheckpointError, load_checkpoint  # noqa: E402,F401
from .quantization import ResidualVectorQuantizer  # noqa: E402,F401
from .reference.quantization import QuantizedResult  # noqa: E402,F401
from .seanet import SEANetDecoder, SEANetEncoder  # noqa: E402,F401
from .model import EncodecModel  # noqa: E402,F401
from .pretrained import EncodecConfig  # noqa: E402,F401
from .hf import EncodecModel as HFEncodecModel  # noqa: E402,F401
from .compat import AudiocraftEncodecModel  # noqa: E402,F401
from .patching import is_patched, patch, unpatch  # noqa: E402,F401
