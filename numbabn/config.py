"""Tunable numbers of the kernels, in one place.

The chunk sizes fix how a reduction is split into partial results. They depend on the
shape only, never on the thread count, which is what makes every result bitwise the
same whatever ``NUMBA_NUM_THREADS`` is. Changing them changes the low bits of the
statistics (a different summation order), so treat them as part of the numerics.
"""

#: Elements of one channel that one task reduces before its partial result is merged.
#: 32768 float32 elements (128 KiB) keep a task long enough to amortize its start-up
#: and short enough that two cores get dozens of tasks on a 1-million-element input.
CHUNK_ELEMENTS = 32768

#: Upper bound on the number of chunks along the batch axis, so the partial results
#: stay O(C * MAX_CHUNKS) however long the batch is.
MAX_CHUNKS = 1024

#: Independent accumulators per task in the channels-first reductions. Without
#: reassociation (no fastmath) one accumulator is a serial chain of dependent adds, and
#: 3-D indexing or 16 lanes stayed scalar: 64 lanes, walked as 1-D slices, let LLVM
#: vectorize while the summation order stays the one written in the source (measured on
#: (64, 64, 56, 56) float32, 2 cores: 1 lane 4.9 ms, 16 lanes 6.0 ms, 64 lanes 2.3 ms,
#: 256 lanes 3.5 ms).
LANES = 64

#: Channels-first runs (the H*W elements of one image's channel) shorter than this are
#: normalized a whole outer index per task instead of a run per task (elementwise
#: passes only: no sum changes order).
SHORT_RUN = 256

#: Rows layouts (channels last, (N, C)) narrower than this many channels are folded: a
#: C-ordered (R, C) block is viewed as (R / g, g * C), g rows side by side, at least
#: ``FOLD_ROW_WIDTH`` values wide (g the smallest divisor of R that reaches it;
#: ``_kernels_cpu.fold_rows``), and the kernels use per-channel vectors tiled to that
#: width. A row of a few channels is too short a loop to vectorize: float32, 2 threads,
#: (128, 28, 28, 6) train 1031 -> 243 us folded to 96 wide, -> 171 us to 192;
#: (32, 32, 32, 16): 359 -> 198 us at 128; (32, 32, 32, 32): 485 -> 361 us at 128;
#: 64 channels gained 0-10% (left alone). The elementwise passes do the same operations
#: on the same elements (same bits); the reductions' partial results are per column
#: and merge per channel in a fixed order, from the shape alone (new low bits).
FOLD_ROWS_BELOW = 64
FOLD_ROW_WIDTH = 128

#: Inputs with fewer elements run their kernels on the calling thread only. With
#: OMP_WAIT_POLICY=PASSIVE (numbabn's default) waking the second thread costs ~100 us
#: here; measured on 2 cores, statistics pass of float32 (n/64, 64), mean of back-to-back
#: calls, 1 vs 2 threads: 2**16: 25 vs 132 us, 2**18: 69 vs 170 us, 2**19: 184 vs
#: 195 us, 2**20: 369 vs 290 us, 2**21: 742 vs 485 us.
SERIAL_BELOW = 2 ** 19

#: The same threshold for numbabn's PyTorch op (``numbabn.torch._native``), whose tasks run
#: on PyTorch's own OpenMP pool: awake inside a model step and cheap to use, so it takes
#: PyTorch's own grain (``at::internal::GRAIN_SIZE``). Measured on 2 cores, the op's eval
#: forward in a loop, right after a PyTorch op, forced serial vs parallel: (64, 256) 35 vs
#: 37 us, (32, 128, 8, 8) 122 vs 93 us; inside LeNet's training step (backward hooks,
#: medians, two runs) the (128, 16, 10, 10) backward 414-415 us at 2**19 against 268-307 us
#: at 2**14-2**16, the other layers unchanged. The crossover depends on the CPU: on an
#: AVX-512 Zen 4, whose cores do the small passes faster, 2**18 took ResNet-18's BN layers
#: (batch 32, 64x64) from 4.65 to 3.73 ms per eval step and 22.1 to 16.7 ms per training
#: step (one process, the op's threshold switched between rounds), LeNet's 1.67 -> 1.76 ms.
TORCH_SERIAL_BELOW = 2 ** 15

# ------------------------------------------------------------------------- CUDA launches
# The CUDA kernels split every channel's elements into blocks by these numbers and the
# array's shape alone (``numbabn._cuda.launch_plan``), never by the device: the same
# input gives the same bits on any GPU. Like the chunk sizes above, they are part of
# the numerics (the order of the sums); the tests shrink them so that tiny inputs span
# several blocks.

#: Threads of one block; a power of two (the block reductions halve it level by level).
#: 256 threads x 8 resident blocks fill an SM's 2048 thread slots.
CUDA_THREADS_PER_BLOCK = 256

#: Upper bound on the blocks that share one channel, hence on the partial results the
#: second reduction stage merges per channel. At most 65535 (a grid dimension's limit).
CUDA_MAX_BLOCKS_PER_CHANNEL = 1024

#: Blocks a launch aims at over all channels: enough to keep the largest GPUs' SMs busy
#: (132 SMs x 8 blocks of 256 threads on an H100 is 1056), from the shape alone.
CUDA_TARGET_BLOCKS = 1024

#: Fewest elements of a channel each thread gets before more blocks are added: on small
#: inputs a block's start-up and its partial result cost more than its share of work.
CUDA_MIN_ELEMENTS_PER_THREAD = 16
