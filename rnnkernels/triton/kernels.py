# Triton kernels of the recurrence of one layer and one direction over a whole sequence: the forward
# sweep (recurrent matmul h W_hh^T fused with the gates and the state update) and the backward sweep
# (gate derivatives fused with dh W_hh), for every cell; and one inference step with both matmuls fused
# (step_kernel, for generation). Shapes as in csrc/recurrence_args.h.
#
# What the kernels assume (rnnkernels/triton/launch.py checks it on the host before any launch):
# - every tensor contiguous, row-major, on one device; gx, weights, output and workspace in one dtype
#   (float32, float16 or bfloat16); the states the sweep carries (h, c, dh, dc) float32 scratch
#   buffers of shape (2, B, width), read from slot s % 2 and written to the other at step s;
# - lengths int32 on the device, each in [0, T] (the launcher passes T for every sequence when the
#   caller has none); every (t, b) of output, workspace and gradients is written, zeros where t >= length;
# - the tiles: BLOCK_B, BLOCK_N, BLOCK_K powers of two >= 16 (tl.dot's minimum); any B, H, P is masked;
# - T * B and G * H * max(H, P) below 2^31: indices are int32 until they scale a row width (then int64);
#   step_kernel: x (B, I), h and c (B, H), G * H * max(I, H) below 2^31, no lengths (every row steps);
# - a program owns the batch rows of its tile (axis 0) and the columns n0, n0 + num_programs(1) *
#   BLOCK_N, ... of each phase (axis 1). The persistent path (GRID_SYNC) launches all time steps at once
#   and separates the phases whose data crosses programs by a barrier among the programs of a batch tile
#   (_grid_barrier on that tile's counter in sync_ptr, zero at launch). Where a tile has more than one
#   program, launch.py keeps the grid no larger than the multiprocessor count, so that on an otherwise
#   idle GPU all programs are resident and meet (kernels of other streams can delay them). Its
#   release and acquire, each with a CTA barrier on its side, are what make one program's stores visible
#   to another's plain loads (L1 included) in the PTX memory model. The per-step path launches each phase
#   of each step on its own, and stream order does the rest.
# - Triton's interpreter runs programs one after another, so no barrier could wait there for another: it
#   runs the persistent path with one program per batch tile, and the per-step path with the columns
#   split as on the GPU. (The tests also run it with each program in a thread of its own,
#   tests/triton_threads.py, so that several programs meet at the barriers.)
# - a barrier that waits max_polls polls gives up, later barriers of the launch do not wait, and the
#   program's results from then on are NaN (_poison), so a broken residency shows as NaN, not as a hang
#   or as numbers that look right.
# - accumulation in float32; the operands of every tl.dot are first rounded to the weights' dtype, as
#   torch.nn rounds its states.
# - Triton's interpreter gets bfloat16 wrong (its tl.dot multiplies the bit patterns as integers, its
#   float32 -> bfloat16 cast truncates): under INTERPRETED the kernels round by hand and dot in float32
#   on the same rounded values, so the interpreter computes what the GPU computes.
import triton
import triton.language as tl

# Whether @triton.jit below builds interpreted functions: it reads the same knob when it decorates.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


def _squeeze_scalar_index() -> None:
    """Triton 3.6's interpreter passes a scalar argument as a one-element array and gives range() its
    int(), which NumPy 2.4 refuses for arrays with a dimension ("only 0-dimensional arrays can be converted
    to Python scalars"), so every loop over an argument failed. Triton 3.7 squeezes the array first; this
    does the same in the older interpreter. The squeezing __index__ goes in in place of the other, never
    after it: the interpreter patches the tensor class again at every call of a jit function inside a
    kernel, so with programs in threads (tests/triton_threads.py) another program could run in between."""
    from triton.runtime import interpreter

    patch_tensor_methods = interpreter._patch_lang_tensor

    def squeezed_index(tensor):
        return int(tensor.handle.data.squeeze())

    class Squeezing:  # the patch scope, but for the one method
        def __init__(self, scope):
            self.scope = scope

        def set_attr(self, obj, name, value):
            self.scope.set_attr(obj, name, squeezed_index if name == "__index__" else value)

        def __getattr__(self, name):
            return getattr(self.scope, name)

    interpreter._patch_lang_tensor = lambda tensor, scope: patch_tensor_methods(tensor, Squeezing(scope))


if INTERPRETED and tuple(int(part) for part in triton.__version__.split(".")[:2]) == (3, 6):
    _squeeze_scalar_index()

# ------------------------------------------------------------------------------------- gate math
# The formulas of rnnkernels/reference.py and csrc/cell_math.h, once per cell, in float32.


@triton.jit
def _sigmoid(x):
    # exp of a non-positive argument only: no overflow for any x; NaN stays NaN.
    e = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + e)
    return tl.where(x >= 0, s, e * s)


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _lstm_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g)
    o = _sigmoid(pre_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _lstm_backward(dh, dc_next, i, f, g, o, c, c_prev):
    tanh_c = _tanh(c)
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dh * tanh_c * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc * f


@triton.jit
def _gru_forward(pre_r, pre_z, x_n, hn, h_prev):
    # hn = W_hn h + b_hn, the recurrent part of the candidate, which the reset gate scales.
    r = _sigmoid(pre_r)
    z = _sigmoid(pre_z)
    n = _tanh(x_n + r * hn)
    return r, z, n, (1.0 - z) * n + z * h_prev


@triton.jit
def _gru_backward(dh, r, z, n, hn, h_prev):
    # Returns the gradients of pre_r, pre_z, x_n and hn, and the share of dL/dh_prev that bypasses W_hh.
    d_xn = dh * (1.0 - z) * (1.0 - n * n)
    d_r = d_xn * hn * r * (1.0 - r)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    return d_r, d_z, d_xn, d_xn * r, dh * z


@triton.jit
def _rnn_forward(pre, RELU: tl.constexpr):
    if RELU:
        return tl.where((pre > 0) | (pre != pre), pre, 0.0)  # NaN stays NaN, as in torch.relu
    else:
        return _tanh(pre)


@triton.jit
def _rnn_backward(dh, h, RELU: tl.constexpr):
    if RELU:
        return tl.where(h <= 0, 0.0, dh)  # as torch: NaN passes the gradient
    else:
        return dh * (1.0 - h * h)


# ------------------------------------------------------------------------------------ matmul tiles
@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x in dtype, rounded to nearest even."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _dot_operand(x):
    if INTERPRETED:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _weights(ptr, mask):
    return _dot_operand(tl.load(ptr, mask=mask, other=0.0))


@triton.jit
def _matmul_tiles(a_rows, a2_rows, row_mask, K, w_ptr, cols, col_mask, stride_n, stride_k, gate_stride,
                  GATES: tl.constexpr, A2: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A W for up to four gates: (BLOCK_B, BLOCK_N) float32 tiles acc_q[b, n] = sum_k a[b, k] w_q[k, n]
    with a[b, k] = a_rows[b][k] (+ a2_rows[b][k] if A2) and w_q[k, n] = w_ptr[q * gate_stride + cols[n] *
    stride_n + k * stride_k]; tiles past GATES stay zero."""
    acc0 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    acc1 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_n
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(a_rows[:, None] + ks[None, :], mask=a_mask, other=0.0).to(tl.float32)
        if A2:
            a += tl.load(a2_rows[:, None] + ks[None, :], mask=a_mask, other=0.0).to(tl.float32)
        a = _dot_operand(_round(a, w_ptr.dtype.element_ty))
        w = w_cols + ks.to(tl.int64)[:, None] * stride_k
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc0 = tl.dot(a, _weights(w, w_mask), acc0, input_precision=PRECISION)
        if GATES > 1:
            acc1 = tl.dot(a, _weights(w + gate_stride, w_mask), acc1, input_precision=PRECISION)
            acc2 = tl.dot(a, _weights(w + 2 * gate_stride, w_mask), acc2, input_precision=PRECISION)
        if GATES > 3:
            acc3 = tl.dot(a, _weights(w + 3 * gate_stride, w_mask), acc3, input_precision=PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def _load(rows_ptr, cols, mask):
    """A (BLOCK_B, BLOCK_N) tile at rows_ptr[b] + cols[n], as float32."""
    return tl.load(rows_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(rows_ptr, cols, mask, value):
    tl.store(rows_ptr[:, None] + cols[None, :], _round(value, rows_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_tiles(rows_ptr, cols, mask, H, GATES: tl.constexpr):
    """The (rows, BLOCK_N) tiles at rows_ptr[b] + q * H + cols[n] of each gate q, as float32; zeros past
    GATES."""
    x0 = _load(rows_ptr, cols, mask)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    x3 = tl.zeros_like(x0)
    if GATES > 1:
        x1 = _load(rows_ptr, H + cols, mask)
        x2 = _load(rows_ptr, 2 * H + cols, mask)
    if GATES > 3:
        x3 = _load(rows_ptr, 3 * H + cols, mask)
    return x0, x1, x2, x3


@triton.jit
def _plus_bias(t0, t1, t2, t3, b_ptr, units, unit_mask, H, GATES: tl.constexpr):
    """Each gate's tile t_q plus the gate's bias b_ptr[q * H + units], broadcast over the rows."""
    one_row = b_ptr + tl.zeros((1,), tl.int32)
    b0, b1, b2, b3 = _gate_tiles(one_row, units, unit_mask[None, :], H, GATES)
    return t0 + b0, t1 + b1, t2 + b2, t3 + b3


# ------------------------------------------------------------------------------- the cell of a tile
@triton.jit
def _cell_forward(x0, x1, x2, x3, r0, r1, r2, r3, h_prev, c_prev, keep, mask, ws_rows, units, H,
                  CELL: tl.constexpr, KEEP_WORKSPACE: tl.constexpr):
    """(h, c) of a tile from the gates' input parts x_q and recurrent parts r_q (biases included); c is
    c_prev but for the LSTM, h_prev is read by the GRU only. With KEEP_WORKSPACE, stores the step's row of
    the workspace (what the backward reads) where keep, zeros elsewhere."""
    c = c_prev
    if CELL == "lstm":
        i, f, g, o, c, h = _lstm_forward(x0 + r0, x1 + r1, x2 + r2, x3 + r3, c_prev)
        if KEEP_WORKSPACE:
            _store(ws_rows, units, mask, tl.where(keep, i, 0.0))
            _store(ws_rows, H + units, mask, tl.where(keep, f, 0.0))
            _store(ws_rows, 2 * H + units, mask, tl.where(keep, g, 0.0))
            _store(ws_rows, 3 * H + units, mask, tl.where(keep, o, 0.0))
            _store(ws_rows, 4 * H + units, mask, tl.where(keep, c, 0.0))
    elif CELL == "gru":
        r, z, n, h = _gru_forward(x0 + r0, x1 + r1, x2, r2, h_prev)
        if KEEP_WORKSPACE:
            _store(ws_rows, units, mask, tl.where(keep, r, 0.0))
            _store(ws_rows, H + units, mask, tl.where(keep, z, 0.0))
            _store(ws_rows, 2 * H + units, mask, tl.where(keep, n, 0.0))
            _store(ws_rows, 3 * H + units, mask, tl.where(keep, r2, 0.0))
    else:
        h = _rnn_forward(x0 + r0, CELL == "rnn_relu")
    return h, c


# -------------------------------------------------------------------------------------- grid barrier
@triton.jit
def _grid_barrier(counter_ptr, arrivals, timeouts, max_polls, GRID_SYNC: tl.constexpr):
    """The end of a phase: with GRID_SYNC, waits until every program of the batch tile has ended it too
    (the counter reaches `arrivals` ends of num_programs(1) programs each); else only the program's own
    threads. Returns (arrivals, timeouts) counted on."""
    tl.debug_barrier()  # every thread's stores of the phase come before the release below
    if GRID_SYNC:
        arrivals += 1
        target = arrivals * tl.num_programs(1)
        # One thread of the program does each atomic (Triton's scalar atomics): acq_rel releases this
        # program's stores and, for the last to arrive, acquires everybody else's.
        seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
        polls = 0
        while (timeouts == 0) & (seen < target) & (polls < max_polls):
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            polls += 1
        timeouts += (seen < target).to(tl.int32)
        tl.debug_barrier()  # the acquire comes before every thread's loads of the next phase
    return arrivals, timeouts


@triton.jit
def _poison(timeouts):
    """NaN once a barrier of this launch gave up, else 0: added to what the program computes after it (which
    read states that may not have been written yet), it spreads through the recurrence to every later step,
    output and final state."""
    return tl.where(timeouts > 0, float("nan"), 0.0)


# ------------------------------------------------------------------------------------------ forward
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def forward_kernel(
    gx_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, lengths_ptr,
    h_ptr, c_ptr, m_ptr,  # float32: h (2, B, P), c (2, B, H) for LSTM, m = o * tanh(c) (B, H) if PROJECTED
    out_ptr, ws_ptr,  # output (T, B, P); workspace (T, B, 5H) LSTM i, f, g, o, c; GRU r, z, n, hn
    sync_ptr,  # int32 (batch tiles,) zeros if GRID_SYNC
    T, B, H, P, reverse, step_begin, step_end, max_polls,
    CELL: tl.constexpr, GATES: tl.constexpr, HAS_BIAS: tl.constexpr, PROJECTED: tl.constexpr,
    KEEP_WORKSPACE: tl.constexpr, GATE_PHASE: tl.constexpr, PROJECTION_PHASE: tl.constexpr,
    GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Steps [step_begin, step_end) of the sweep. Phases of a step: the gates (columns: hidden units),
    then for a projected LSTM h = m W_hr^T (columns: P). Each reads the whole state the phase before wrote."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    counter = sync_ptr + tl.program_id(0)
    arrivals = 0
    timeouts = 0
    row_mask = rows < B
    length = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
    first_col = tl.program_id(1) * BLOCK_N
    col_step = tl.num_programs(1) * BLOCK_N
    W = 5 * H if CELL == "lstm" else 4 * H
    for s in range(step_begin, step_end):
        t = s + reverse * (T - 1 - 2 * s)
        cur = s % 2
        active = row_mask & (t < length)
        seq_rows = (t * B + rows).to(tl.int64)  # rows of the (T * B, width) buffers
        h_cur = h_ptr + (cur * B + rows).to(tl.int64) * P
        h_next = h_ptr + ((1 - cur) * B + rows).to(tl.int64) * P
        out_rows = out_ptr + seq_rows * P
        if GATE_PHASE:
            c_cur = c_ptr + (cur * B + rows).to(tl.int64) * H
            c_next = c_ptr + ((1 - cur) * B + rows).to(tl.int64) * H
            gx_rows = gx_ptr + seq_rows * (GATES * H)
            ws_rows = ws_ptr + seq_rows * W
            for n0 in range(first_col, H, col_step):
                units = n0 + tl.arange(0, BLOCK_N)
                unit_mask = units < H
                mask = row_mask[:, None] & unit_mask[None, :]
                keep = active[:, None] & unit_mask[None, :]
                r0, r1, r2, r3 = _matmul_tiles(h_cur, h_cur, row_mask, P, w_hh_ptr, units, unit_mask, P, 1, H * P,
                                               GATES, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                if HAS_BIAS:
                    r0, r1, r2, r3 = _plus_bias(r0, r1, r2, r3, b_hh_ptr, units, unit_mask, H, GATES)
                if GRID_SYNC:
                    r0 += _poison(timeouts)
                c_prev = r0
                h_prev = r0
                if CELL == "lstm":
                    c_prev = _load(c_cur, units, mask)
                if CELL == "gru":
                    h_prev = _load(h_cur, units, mask)
                x0, x1, x2, x3 = _gate_tiles(gx_rows, units, mask, H, GATES)
                h, c = _cell_forward(x0, x1, x2, x3, r0, r1, r2, r3, h_prev, c_prev, keep, mask, ws_rows, units, H,
                                     CELL, KEEP_WORKSPACE)
                if CELL == "lstm":
                    _store(c_next, units, mask, tl.where(keep, c, c_prev))
                if PROJECTED:
                    _store(m_ptr + rows.to(tl.int64) * H, units, mask, h)
                else:
                    _store(h_next, units, mask, tl.where(keep, h, _load(h_cur, units, mask)))
                    _store(out_rows, units, mask, tl.where(keep, h, 0.0))
            arrivals, timeouts = _grid_barrier(counter, arrivals, timeouts, max_polls, GRID_SYNC)
        if PROJECTION_PHASE:
            m_rows = m_ptr + rows.to(tl.int64) * H
            for n0 in range(first_col, P, col_step):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_mask = cols < P
                mask = row_mask[:, None] & col_mask[None, :]
                keep = active[:, None] & col_mask[None, :]
                h, _, _, _ = _matmul_tiles(m_rows, m_rows, row_mask, H, w_hr_ptr, cols, col_mask, H, 1, 0,
                                           1, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                if GRID_SYNC:
                    h += _poison(timeouts)
                _store(h_next, cols, mask, tl.where(keep, h, _load(h_cur, cols, mask)))
                _store(out_rows, cols, mask, tl.where(keep, h, 0.0))
            arrivals, timeouts = _grid_barrier(counter, arrivals, timeouts, max_polls, GRID_SYNC)


# -------------------------------------------------------------------------------------- one step
@triton.jit
def step_kernel(
    x_ptr, h_prev_ptr, c_prev_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr,  # x (B, I), h, c (B, H)
    h_next_ptr, c_next_ptr,  # (B, H) each; c for the LSTM only
    B, I, H,
    CELL: tl.constexpr, GATES: tl.constexpr, HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One time step of a cell for inference (generation), both matmuls x W_ih^T and h W_hh^T fused with
    the gates: one launch a step. A program owns a tile of batch rows (axis 0) and of hidden units (axis 1);
    no projection (proj_size), no workspace (nothing to differentiate)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    unit_mask = units < H
    mask = row_mask[:, None] & unit_mask[None, :]
    x_rows = x_ptr + rows.to(tl.int64) * I
    h_rows = h_prev_ptr + rows.to(tl.int64) * H
    x0, x1, x2, x3 = _matmul_tiles(x_rows, x_rows, row_mask, I, w_ih_ptr, units, unit_mask, I, 1, H * I,
                                   GATES, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    r0, r1, r2, r3 = _matmul_tiles(h_rows, h_rows, row_mask, H, w_hh_ptr, units, unit_mask, H, 1, H * H,
                                   GATES, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    if HAS_BIAS_IH:
        x0, x1, x2, x3 = _plus_bias(x0, x1, x2, x3, b_ih_ptr, units, unit_mask, H, GATES)
    if HAS_BIAS_HH:
        r0, r1, r2, r3 = _plus_bias(r0, r1, r2, r3, b_hh_ptr, units, unit_mask, H, GATES)
    c_prev = r0
    if CELL == "lstm":
        c_prev = _load(c_prev_ptr + rows.to(tl.int64) * H, units, mask)
    h, c = _cell_forward(x0, x1, x2, x3, r0, r1, r2, r3, _load(h_rows, units, mask), c_prev, mask, mask,
                         h_next_ptr, units, H, CELL, False)
    _store(h_next_ptr + rows.to(tl.int64) * H, units, mask, h)
    if CELL == "lstm":
        _store(c_next_ptr + rows.to(tl.int64) * H, units, mask, c)


# ----------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def backward_kernel(
    grad_out_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr, out_ptr, ws_ptr,
    dh_ptr, dc_ptr,  # float32: dL/dh (2, B, P), dL/dc (2, B, H) for LSTM
    grad_gx_ptr, grad_gh_ptr, g_all_ptr,  # (T, B, G*H) each (grad_gh differs from grad_gx for GRU only);
                                          # (T, B, P) the gradient of each step's h if PROJECTED
    sync_ptr,  # int32 (batch tiles,) zeros if GRID_SYNC
    T, B, H, P, reverse, step_begin, step_end, max_polls,
    CELL: tl.constexpr, GATES: tl.constexpr, PROJECTED: tl.constexpr,
    GATE_PHASE: tl.constexpr, STATE_PHASE: tl.constexpr,
    GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Steps [step_begin, step_end) of the reverse sweep (step 0 undoes the forward's last step). Phases
    of a step: the gate derivatives (columns: hidden units), then dL/dh_prev = d gates W_hh (columns: P).
    The second reads all the gate derivatives; the first reads its own columns of dL/dh_prev, or with a
    projection all of them."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    counter = sync_ptr + tl.program_id(0)
    arrivals = 0
    timeouts = 0
    row_mask = rows < B
    length = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
    first_t = tl.where(reverse != 0, length - 1, 0)  # each sequence's first step, whose state is h0, c0
    first_col = tl.program_id(1) * BLOCK_N
    col_step = tl.num_programs(1) * BLOCK_N
    W = 5 * H if CELL == "lstm" else 4 * H
    GH = GATES * H
    for s in range(step_begin, step_end):
        t = T - 1 - s + reverse * (2 * s - T + 1)
        t_prev = tl.minimum(tl.maximum(t - 1 + 2 * reverse, 0), T - 1)
        cur = s % 2
        active = row_mask & (t < length)
        first = t == first_t
        seq_rows = (t * B + rows).to(tl.int64)
        prev_rows = (t_prev * B + rows).to(tl.int64)
        dh_cur = dh_ptr + (cur * B + rows).to(tl.int64) * P
        dh_next = dh_ptr + ((1 - cur) * B + rows).to(tl.int64) * P
        go_rows = grad_out_ptr + seq_rows * P
        gh_rows = grad_gh_ptr + seq_rows * GH
        if GATE_PHASE:
            dc_cur = dc_ptr + (cur * B + rows).to(tl.int64) * H
            dc_next = dc_ptr + ((1 - cur) * B + rows).to(tl.int64) * H
            ws_rows = ws_ptr + seq_rows * W
            gx_rows = grad_gx_ptr + seq_rows * GH
            for n0 in range(first_col, H, col_step):
                units = n0 + tl.arange(0, BLOCK_N)
                unit_mask = units < H
                mask = row_mask[:, None] & unit_mask[None, :]
                keep = active[:, None] & unit_mask[None, :]
                from_state = keep & first[:, None]
                from_sweep = keep & ~first[:, None]
                if PROJECTED:  # dL/dm = (dL/dh) W_hr
                    g, _, _, _ = _matmul_tiles(dh_cur, go_rows, row_mask, P, w_hr_ptr, units, unit_mask, 1, H, 0,
                                               1, True, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                else:
                    g = _load(dh_cur, units, mask) + _load(go_rows, units, mask)
                if GRID_SYNC:
                    g += _poison(timeouts)
                if CELL == "lstm":
                    c_prev = tl.where(first[:, None], _load(c0_ptr + rows.to(tl.int64) * H, units, from_state),
                                      _load(ws_ptr + prev_rows * W, 4 * H + units, from_sweep))
                    dc_after = _load(dc_cur, units, mask)
                    d_i, d_f, d_g, d_o, dc = _lstm_backward(
                        g, dc_after, _load(ws_rows, units, mask), _load(ws_rows, H + units, mask),
                        _load(ws_rows, 2 * H + units, mask), _load(ws_rows, 3 * H + units, mask),
                        _load(ws_rows, 4 * H + units, mask), c_prev)
                    _store(gx_rows, units, mask, tl.where(keep, d_i, 0.0))
                    _store(gx_rows, H + units, mask, tl.where(keep, d_f, 0.0))
                    _store(gx_rows, 2 * H + units, mask, tl.where(keep, d_g, 0.0))
                    _store(gx_rows, 3 * H + units, mask, tl.where(keep, d_o, 0.0))
                    _store(dc_next, units, mask, tl.where(keep, dc, dc_after))
                elif CELL == "gru":
                    h_prev = tl.where(first[:, None], _load(h0_ptr + rows.to(tl.int64) * P, units, from_state),
                                      _load(out_ptr + prev_rows * P, units, from_sweep))
                    d_r, d_z, d_xn, d_hn, _ = _gru_backward(
                        g, _load(ws_rows, units, mask), _load(ws_rows, H + units, mask),
                        _load(ws_rows, 2 * H + units, mask), _load(ws_rows, 3 * H + units, mask), h_prev)
                    _store(gx_rows, units, mask, tl.where(keep, d_r, 0.0))
                    _store(gx_rows, H + units, mask, tl.where(keep, d_z, 0.0))
                    _store(gx_rows, 2 * H + units, mask, tl.where(keep, d_xn, 0.0))
                    _store(gh_rows, units, mask, tl.where(keep, d_r, 0.0))
                    _store(gh_rows, H + units, mask, tl.where(keep, d_z, 0.0))
                    _store(gh_rows, 2 * H + units, mask, tl.where(keep, d_hn, 0.0))
                else:
                    d = _rnn_backward(g, _load(out_ptr + seq_rows * P, units, mask), CELL == "rnn_relu")
                    _store(gx_rows, units, mask, tl.where(keep, d, 0.0))
            arrivals, timeouts = _grid_barrier(counter, arrivals, timeouts, max_polls, GRID_SYNC)
        if STATE_PHASE:
            for n0 in range(first_col, P, col_step):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_mask = cols < P
                mask = row_mask[:, None] & col_mask[None, :]
                keep = active[:, None] & col_mask[None, :]
                dh, _, _, _ = _matmul_tiles(gh_rows, gh_rows, row_mask, GH, w_hh_ptr, cols, col_mask, 1, P, 0,
                                            1, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                if GRID_SYNC:
                    dh += _poison(timeouts)
                dh_after = _load(dh_cur, cols, mask)
                if CELL == "gru":  # the share of dL/dh_prev through h = (1 - z) n + z h_prev
                    dh += (dh_after + _load(go_rows, cols, mask)) * _load(ws_ptr + seq_rows * W, H + cols, mask)
                if PROJECTED:
                    _store(g_all_ptr + seq_rows * P, cols, mask,
                           tl.where(keep, dh_after + _load(go_rows, cols, mask), 0.0))
                _store(dh_next, cols, mask, tl.where(keep, dh, dh_after))
            arrivals, timeouts = _grid_barrier(counter, arrivals, timeouts, max_polls, GRID_SYNC and PROJECTED)
