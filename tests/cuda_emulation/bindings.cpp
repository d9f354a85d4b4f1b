// The CUDA backend's operator implementations (csrc/cuda/recurrence_cuda.h), built for the host emulation,
// as Python functions named like the operators; tests/cuda_emulation/__init__.py installs them as the CPU
// kernels of the rnnkernels operators while a test runs.
#include <torch/extension.h>

#include "../../csrc/cuda/kernels.cuh"
#include "../../csrc/cuda/recurrence_cuda.h"

namespace {

// Kernels that break CUDA's rules on purpose, so that tests see the emulation report each mistake.
// Each thread stores its index in shared memory and reads its neighbour's, with or without the barrier.
__global__ void neighbour(int* out, bool barrier) {
  int* shared = rnnkernels::cuda::dynamic_shared<int>();
  shared[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = shared[(threadIdx.x + 1) % blockDim.x];
}

__global__ void split_barrier() {  // the first warp waits at __syncthreads, the rest at grid.sync
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    cooperative_groups::this_grid().sync();
  }
}

__global__ void divergent_syncthreads() {  // each half of the block at its own __syncthreads
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_after_return(float* out) {
  if (threadIdx.x % 32 == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void misaligned_load(const float* in, float* out) {
  out[0] = rnnkernels::cuda::load_readonly(in + 1).v[0];
}

__global__ void past_shared(float* out) {
  float* shared = rnnkernels::cuda::dynamic_shared<float>();
  shared[threadIdx.x + 1] = 1.f;  // the launch sizes blockDim.x floats
  out[threadIdx.x] = 0.f;
}

__global__ void stale_read_only(float* data) {  // reads through __ldg what another block writes
  if (blockIdx.x == 0) {
    data[threadIdx.x * 4] = rnnkernels::cuda::load_readonly(data + 4 * (blockDim.x + threadIdx.x)).v[0];
  } else {
    data[4 * (blockDim.x + threadIdx.x)] = 1.f;
  }
}

__global__ void past_global(float* out) { out[threadIdx.x + 1] = 1.f; }  // out holds blockDim.x floats

// Two blocks, one grid barrier a step: each reads what the other wrote at the step before and writes that
// plus one, so after `steps` steps every value is `steps`. In one slot a block may overwrite the value
// before the other has read it (a race between blocks, which only their drifting apart shows); in two
// slots, read one and write the other by the step's parity (as the persistent kernels do), it is right.
__global__ void exchange(float* slots, float* out, int steps, bool two_slots) {
  const int me = static_cast<int>(blockIdx.x), other = 1 - me, t = static_cast<int>(threadIdx.x);
  float value = 0.f;
  for (int s = 0; s < steps; ++s) {
    const float* read = slots + (two_slots ? (s + 1) % 2 : 0) * 64;
    float* write = slots + (two_slots ? s % 2 : 0) * 64;
    value = read[other * 32 + t] + 1.f;
    __syncthreads();
    write[me * 32 + t] = value;
    cooperative_groups::this_grid().sync();
  }
  out[me * 32 + t] = value;
}

at::Tensor probe(const std::string& name) {
  using rnnkernels::cuda::launch_cooperative;
  using rnnkernels::cuda::launch_kernel;
  at::Tensor out = at::zeros({64}, at::kFloat);
  if (name == "neighbour" || name == "neighbour_with_barrier") {
    at::Tensor ints = at::zeros({64}, at::kInt);
    launch_kernel(neighbour, 1, 64, 64 * sizeof(int), ints.data_ptr<int>(), name == "neighbour_with_barrier");
    return ints;
  }
  if (name == "split_barrier") launch_cooperative(split_barrier, 1, 64, 0);
  if (name == "divergent_syncthreads") launch_kernel(divergent_syncthreads, 1, 64, 0);
  if (name == "shuffle_after_return") launch_kernel(shuffle_after_return, 1, 64, 0, out.data_ptr<float>());
  if (name == "misaligned_load") launch_kernel(misaligned_load, 1, 32, 0, out.data_ptr<float>(), out.data_ptr<float>());
  if (name == "stale_read_only") launch_kernel(stale_read_only, 2, 8, 0, out.data_ptr<float>());
  if (name == "past_global") launch_kernel(past_global, 1, 64, 0, out.data_ptr<float>());
  if (name == "past_shared") launch_kernel(past_shared, 1, 64, 64 * sizeof(float), out.data_ptr<float>());
  if (name == "exchange_one_slot" || name == "exchange_two_slots") {
    at::Tensor slots = at::zeros({2, 64}, at::kFloat);
    launch_cooperative(exchange, 2, 32, 0, slots.data_ptr<float>(), out.data_ptr<float>(), 8,
                       name == "exchange_two_slots");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using rnnkernels::Cell;
  m.def("linear", &rnnkernels::linear_cuda);
#define RNNKERNELS_BIND(cell, prefix)                            \
  m.def(prefix "_forward", &rnnkernels::forward_cuda<cell>);     \
  m.def(prefix "_backward", &rnnkernels::backward_cuda<cell>);   \
  m.def(prefix "_step", &rnnkernels::step_cuda<cell>);
  RNNKERNELS_BIND(Cell::LSTM, "lstm")
  RNNKERNELS_BIND(Cell::GRU, "gru")
  RNNKERNELS_BIND(Cell::RNN_TANH, "rnn_tanh")
  RNNKERNELS_BIND(Cell::RNN_RELU, "rnn_relu")
#undef RNNKERNELS_BIND
  m.def(
      "configure",
      [](int multiprocessors, uint64_t seed) {
        auto& device = rnnkernels::emulation::device();
        device.multiprocessors = multiprocessors;
        device.seed = seed;
      },
      "The emulated device's multiprocessors, and the seed of the order its threads run in.");
  m.def(
      "launches",
      [] {
        const auto& device = rnnkernels::emulation::device();
        return std::make_tuple(device.launches, device.cooperative_launches);
      },
      "Launches made so far: (plain, cooperative).");
  m.def("probe", &probe, "Runs one of the rule-breaking kernels above by name.");
}
