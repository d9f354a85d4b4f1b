"""rnnkernels: fused LSTM, GRU and RNN layers for PyTorch, drop-in for torch.nn."""

from .backends import BACKENDS, use_backend
from .convert import convert
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__version__ = "0.1.0"
__all__ = ["BACKENDS", "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "convert", "use_backend"]
