"""torch.library custom ops (``fastcodec::*``) and the backend implementations behind them.

Importing registers the schemas and every backend's implementation table; nothing is built or
compiled here (C++ extensions build on first use, Triton kernels are imported on first launch).
"""
from . import rvq  # noqa: F401  (fastcodec::rvq_* schemas and the reference impls)
from . import rvq_cpp  # noqa: F401  (backend "cpp")
from . import rvq_triton  # noqa: F401  (backend "triton")
from .rvq import ema_update, kmeans, rvq_decode, rvq_encode, rvq_quantize, rvq_quantize_train  # noqa: F401
from . import conv  # noqa: F401  (fastcodec::conv1d / conv_transpose1d and their cpp/cuda backends)
from .conv import conv1d, conv_transpose1d  # noqa: F401
from . import resblock  # noqa: F401  (fastcodec::resblock)
from . import lstm  # noqa: F401  (fastcodec::lstm, lstm_backward, lstm_step; backend family "lstm")
from . import stream  # noqa: F401  (fastcodec::conv1d_update, conv_transpose1d_update; family "streaming")
