// Host emulation of the CUDA subset cellseg's kernels use, so the same .cu sources run on a CPU.
//
// Serial mode (default): a loop over blocks and, inside each block, over its threads.
// Threaded mode (emu::threaded = true): each block's threads run as std::threads sharing a
// barrier, which __syncthreads() waits on. __syncthreads() in serial mode aborts with a message,
// never silently passes. Atomics take one global lock. Anything not defined here (warp
// intrinsics, __half, textures) fails to compile: nothing is skipped silently.
#pragma once
#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::mutex atomic_lock;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline bool threaded = false;

template <class Body>
void launch(dim3 grid, dim3 block, Body body) {
    grid_dim = grid;
    block_dim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                dim3 b(bx, by, bz);
                if (!threaded) {
                    block_idx = b;
                    for (unsigned tz = 0; tz < block.z; ++tz)
                        for (unsigned ty = 0; ty < block.y; ++ty)
                            for (unsigned tx = 0; tx < block.x; ++tx) {
                                thread_idx = dim3(tx, ty, tz);
                                body();
                            }
                    continue;
                }
                std::ptrdiff_t n = static_cast<std::ptrdiff_t>(block.x) * block.y * block.z;
                std::barrier<> bar(n);
                std::vector<std::thread> threads;
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx)
                            threads.emplace_back([&, b, tx, ty, tz] {
                                block_idx = b;
                                thread_idx = dim3(tx, ty, tz);
                                block_barrier = &bar;
                                body();
                            });
                for (auto& t : threads) t.join();
            }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__ static
#define __device__ static inline
#define __shared__ static  // blocks run one at a time, so one copy serves each block in turn
#define __restrict__

inline void __syncthreads() {
    if (emu::block_barrier == nullptr) {
        std::fprintf(stderr, "__syncthreads() needs the threaded emulation mode\n");
        std::abort();
    }
    emu::block_barrier->arrive_and_wait();
}

template <class T> T atomicAdd(T* address, T value) {
    std::lock_guard<std::mutex> guard(emu::atomic_lock);
    T old = *address;
    *address = old + value;
    return old;
}
template <class T> T atomicMax(T* address, T value) {
    std::lock_guard<std::mutex> guard(emu::atomic_lock);
    T old = *address;
    *address = std::max(old, value);
    return old;
}
template <class T> T atomicOr(T* address, T value) {
    std::lock_guard<std::mutex> guard(emu::atomic_lock);
    T old = *address;
    *address = old | value;
    return old;
}

inline unsigned int __float_as_uint(float value) {
    unsigned int bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

using std::max;
using std::min;
