"""The faithful PyTorch reference of EnCodec: the oracle every fast path is tested against.

Plain PyTorch (depends on torch only), written from audiocraft 1.3.0's / encodec 0.1.1's semantics
with the same constructor arguments, attribute names and ``state_dict`` keys.
"""
from . import functional  # noqa: F401
from .conv import (  # noqa: F401
    NormConv1d,
    NormConvTranspose1d,
    StreamableConv1d,
    StreamableConvTranspose1d,
    get_extra_padding_for_conv1d,
    pad1d,
    unpad1d,
)
from .functional import commitment_loss, init_codebooks, rvq_dequantize, rvq_quantize  # noqa: F401
from .lstm import StreamableLSTM  # noqa: F401
from .model import EncodecModel, linear_overlap_add  # noqa: F401
from .quantization import (  # noqa: F401
    EuclideanCodebook,
    QuantizedResult,
    ResidualVectorQuantization,
    ResidualVectorQuantizer,
    VectorQuantization,
)
from .seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock  # noqa: F401
