"""Drop-in twins of torch.nn.RNN, GRU, LSTM and their cells.

A twin is built by torch.nn's own constructor and takes over the module it made (the parameters,
initialisation, state_dict names and argument checks are torch.nn's); only forward differs, plus one
keyword: ``backend`` ("auto" or a name from rnnkernels.backends.BACKENDS).

The sequence twins derive from torch.nn.RNNBase, not from torch.nn.RNN/GRU/LSTM themselves:
torch.compile refuses to trace any instance of those three classes. The cells derive from their
torch.nn class.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends, functional


class _Twin:
    """What every rnnkernels module adds to its torch.nn base."""

    _torch_class: type[nn.Module]
    backend: str

    def __init__(self, *args, backend: str = "auto", **kwargs):
        self._adopt(self._torch_class(*args, **kwargs), backend)

    def _adopt(self, module: nn.Module, backend: str, in_its_place: bool = False) -> None:
        # The parameters stay the same tensors. The containers (parameter and hook dicts, the list of flat
        # weights, the set of non-persistent buffers) are copies, so that changing one module leaves the
        # other as it was; or, for a twin that takes the module's place in a model (convert), the very
        # same, so that handles of hooks registered before still remove them.
        for name, value in module.__dict__.items():
            copied = not in_its_place and isinstance(value, (dict, list, set))
            self.__dict__[name] = copy.copy(value) if copied else value
        self.backend = backends.check_name(backend)

    @classmethod
    def from_torch(cls, module: nn.Module, backend: str = "auto", *, in_its_place: bool = False):
        """A twin of `module` holding the very same parameter tensors (optimizers, tied weights keep working).
        in_its_place: it also takes over the module's hooks and other containers (rnnkernels.convert)."""
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch expects a {cls._torch_class.__name__}, got {type(module).__name__}")
        twin = cls.__new__(cls)
        twin._adopt(module, backend, in_its_place)
        return twin

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


class _RNNBase(_Twin):
    """forward of RNN, GRU and LSTM: torch.nn's contract (batched or not, batch_first, PackedSequence, hx)."""

    # torch.nn's checks of the arguments, which the one-comparison test of _well_formed stands in for only
    # where a subclass has not replaced any of them.
    _TORCH_CHECKS = ("check_forward_args", "check_input", "get_expected_hidden_size", "check_hidden_size",
                     "get_expected_cell_size")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._checks_are_torch_nn = all(
            getattr(cls, name, None) is getattr(cls._torch_class, name, None) for name in cls._TORCH_CHECKS)

    def _layer_weights(self) -> list[functional.LayerWeights]:
        # From _parameters, as in the cells: a one-step call (generation) pays for every lookup.
        parameters = self._parameters
        try:
            per_layer = [[parameters[name] for name in names] for names in self._all_weights]
        except KeyError:  # computed on access: under torch.nn.utils.parametrize, prune or weight_norm, and
            # in DataParallel's replicas, whose _parameters are empty
            per_layer = [[getattr(self, name) for name in names] for names in self._all_weights]
        layers = []
        for params in per_layer:
            w_ih, w_hh = params[0], params[1]
            b_ih, b_hh = (params[2], params[3]) if self.bias else (None, None)
            w_hr = params[-1] if self.proj_size > 0 else None
            layers.append(functional.LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr))
        return layers

    def _zeros(self, batch: int, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * directions, batch, size, dtype=dtype, device=device)

    def forward(self, input, hx=None):
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        is_batched = True
        sorted_indices = unsorted_indices = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            check_input, check_sizes = data, batch_sizes
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                name = self._torch_class.__name__
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                _check_hidden_dims(hx, 3 if is_batched else 2, is_lstm)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
            x = input.transpose(0, 1) if self.batch_first else input
            lengths = None
            check_input, check_sizes = input, None
        batch, device = x.size(1), x.device
        autocast = functional.autocast_dtype(device)
        if hx is None:
            dtype = functional.autocast_target(x.dtype, autocast)
            h0 = self._zeros(batch, self.proj_size if self.proj_size > 0 else self.hidden_size, dtype, device)
            hx = (h0, self._zeros(batch, self.hidden_size, dtype, device)) if is_lstm else h0
        weights = self._layer_weights()
        # Under autocast, input in its dtype passes too (the output of a layer before, say), as torch.nn's
        # checks let it.
        dtypes = (weights[0].w_ih.dtype, autocast)
        if packed or not self._checks_are_torch_nn or not self._well_formed(x, hx, is_lstm, dtypes):
            self._update_flat_weights()  # check_input reads the dtype there, as torch.nn's forward refreshes it
            self.check_forward_args(check_input, hx, check_sizes)
        # After the checks, as torch.nn's kernels make these two (where torch.nn has indexed hx's pair,
        # as for unbatched input, a longer tuple no longer reaches them there).
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if is_lstm and len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        h0, c0 = hx if is_lstm else (hx, None)
        if autocast is not None:  # all in one call: without grad, one operator call
            x, h0, c0, *cast = functional.autocast_cast((x, h0, c0, *(t for w in weights for t in w.tensors())),
                                                        autocast)
            per_layer = len(functional.LayerWeights.__slots__)
            weights = [functional.LayerWeights(*cast[i:i + per_layer]) for i in range(0, len(cast), per_layer)]
        backend = backends.select(self.backend, device, x.dtype,
                                  lambda: (x, h0, c0, *(t for w in weights for t in w.tensors())))
        with functional.autocast_off(device, autocast):
            output, h_n, c_n = functional.rnn(
                self.mode.lower(), x, h0, c0, weights, self.num_layers, self.bidirectional,
                self.dropout, self.training, lengths, backend,
            )
        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            output = pack_padded_sequence(output, lengths).data
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, hidden

    def _well_formed(self, x: Tensor, hx, is_lstm: bool, dtypes: tuple) -> bool:
        """Whether an unpacked call passes check_forward_args, in one comparison per tensor: torch.nn's
        checks, with their messages, run only where this fails. dtypes: those x may have."""
        layers, batch = self.num_layers * (2 if self.bidirectional else 1), x.shape[1]
        h_shape = (layers, batch, self.proj_size if self.proj_size > 0 else self.hidden_size)
        if is_lstm:
            if not (isinstance(hx, tuple) and len(hx) == 2 and hx[1].shape == (layers, batch, self.hidden_size)):
                return False
            hx = hx[0]
        return x.dtype in dtypes and x.shape[2] == self.input_size and hx.shape == h_shape


def _check_hidden_dims(hx, dims: int, is_lstm: bool) -> None:
    kind = "batched 3-D" if dims == 3 else "unbatched 2-D"
    if is_lstm:
        if hx[0].dim() != dims or hx[1].dim() != dims:
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {dims}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
    elif hx.dim() != dims:
        raise RuntimeError(f"For {kind} input, hx should also be {dims}-D but got {hx.dim()}-D tensor")


class RNN(_RNNBase, nn.RNNBase):
    _torch_class = nn.RNN


class GRU(_RNNBase, nn.RNNBase):
    _torch_class = nn.GRU


class LSTM(_RNNBase, nn.RNNBase):
    _torch_class = nn.LSTM
    # torch.nn.LSTM's checks of the (h, c) pair.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class _CellBase(_Twin):
    """forward of the cells: one time step through the backend's step (on compiled backends, one operator)."""

    _cell: str

    def _cell_name(self) -> str:
        if self._cell != "rnn":
            return self._cell
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return f"rnn_{self.nonlinearity}"

    def forward(self, input: Tensor, hx=None):
        # Generation calls this once per token, so the common case costs as little Python as it can: the
        # parameters come from _parameters (nn.Module's __getattr__ costs a few hundred nanoseconds a
        # lookup), and one comparison per tensor passes a well-formed call; only a failing one goes on to
        # torch.nn's checks, for their messages.
        is_lstm = self._cell == "lstm"
        states = () if hx is None else tuple(hx) if is_lstm else (hx,)
        is_batched = self._check_dims(input, states)
        if is_lstm and hx is not None:  # what torch.nn's LSTMCell and its kernel make of hx's pair
            if not is_batched:
                states = (hx[0], hx[1])
            elif not isinstance(hx, (tuple, list)):
                raise TypeError(f"lstm_cell(): argument 'hx' must be tuple of Tensors, not {type(hx).__name__}")
            elif len(states) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
        if not is_batched:
            input = input.unsqueeze(0)
            states = tuple(state.unsqueeze(0) for state in states)
        device = input.device
        autocast = functional.autocast_dtype(device)
        if not states:
            dtype = functional.autocast_target(input.dtype, autocast)
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=dtype, device=device)
            states = (zeros, zeros) if is_lstm else (zeros,)
        try:
            parameters = self._parameters
            w_ih, w_hh, b_ih, b_hh = (parameters["weight_ih"], parameters["weight_hh"], parameters["bias_ih"],
                                      parameters["bias_hh"])
        except KeyError:  # moved out by torch.nn.utils.parametrize, prune or weight_norm: computed on access
            w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        if autocast is not None:  # before the checks, which then see what the step gets (as torch.nn's cells)
            input, w_ih, w_hh, b_ih, b_hh, *states = functional.autocast_cast((input, w_ih, w_hh, b_ih, b_hh, *states),
                                                                              autocast)
        dtype, state_shape = w_ih.dtype, (input.shape[0], self.hidden_size)
        well_formed = input.dtype == dtype and input.shape[1] == self.input_size
        for state in states:
            well_formed = well_formed and state.shape == state_shape and state.dtype == dtype
        if not well_formed:
            self._check(input, states, dtype)
        promoted = _PROMOTED_CELL_STATE if is_lstm and states[1].dtype != dtype else None
        backend = backends.select(self.backend, device, dtype, lambda: (input, *states, w_ih, w_hh, b_ih, b_hh),
                                  reference_only=promoted)
        with functional.autocast_off(device, autocast):
            h, c = backend.step(self._cell_name(), input, states[0], states[1] if is_lstm else None, w_ih, w_hh,
                                b_ih, b_hh, None)
        if not is_batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if is_lstm else None
        return (h, c) if is_lstm else h

    def _check_dims(self, input: Tensor, states: tuple[Tensor, ...]) -> bool:
        """torch.nn's checks of the input's and states' dimensions; True for batched input."""
        dims = input.dim()
        if dims != 2 and dims != 1:
            raise ValueError(f"{type(self).__name__}: Expected input to be 1D or 2D, got {dims}D instead")
        for index, state in enumerate(states):
            if state.dim() not in (1, 2):
                label = f"hx[{index}]" if self._cell == "lstm" else "hidden"
                raise ValueError(f"{type(self).__name__}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")
        return dims == 2

    def _check(self, input: Tensor, states: tuple[Tensor, ...], weight_dtype: torch.dtype) -> None:
        # The checks and messages of torch.nn's cell kernels.
        if input.dtype != weight_dtype:
            raise RuntimeError(
                f"expected scalar type {weight_dtype} for the input of {type(self).__name__}, got {input.dtype}"
            )
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for index, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{index} batch size {state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, expected {self.hidden_size}"
                )
            if state.dtype != input.dtype and not (index == 1 and self._cell == "lstm"):  # promoted, as torch.nn's
                raise RuntimeError(f"expected hidden{index} of dtype {input.dtype}, got {state.dtype}")


# torch.nn's LSTM cell type-promotes a cell state in another dtype than its weights: its c' and h' come in the
# promoted dtype. The compiled steps take one dtype; the reference backend's torch operations promote as torch.nn's.
_PROMOTED_CELL_STATE = ("the LSTM cell state's dtype differs from the weights', which torch.nn type-promotes; "
                        "the reference backend runs there")


class RNNCell(_CellBase, nn.RNNCell):
    _torch_class = nn.RNNCell
    _cell = "rnn"


class GRUCell(_CellBase, nn.GRUCell):
    _torch_class = nn.GRUCell
    _cell = "gru"


class LSTMCell(_CellBase, nn.LSTMCell):
    _torch_class = nn.LSTMCell
    _cell = "lstm"


TWINS: dict[type[nn.Module], type[nn.Module]] = {
    twin._torch_class: twin for twin in (RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell)
}
