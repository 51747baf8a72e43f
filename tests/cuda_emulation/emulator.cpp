// The scheduler, barriers and warp collectives of cuda_host_emulation.h (see there for the model).
#include "cuda_host_emulation.h"

#include <ucontext.h>

#include <memory>
#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace qpeft_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Barrier {
  int expected = 0;  // live participants
  int arrived = 0;
  uint64_t generation = 0;     // advances each time the barrier opens
  const void* site = nullptr;  // where the first arrival of this phase waits
};

enum class State { Ready, Waiting, Done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index{};
  State state = State::Ready;
  const Barrier* waiting_on = nullptr;
  uint64_t wait_generation = 0;
};

// A warp's barrier and the registers its lanes publish for one collective (at most an MMA's a0..a3, b0, b1);
// collective n uses slots[n % 2], so a lane that runs ahead into collective n + 1 never overwrites what a slower
// lane is still reading of collective n (it cannot reach collective n + 2 before every lane has arrived at n + 1).
constexpr int kSlotWords = 6;
struct Warp {
  Barrier barrier;
  uint32_t slots[2][32][kSlotWords];
};

struct Scheduler {
  ucontext_t main_context;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block_barrier;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  bool aborted = false;
  std::string error;
};

Scheduler g;
bool g_reverse_order = false;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

Warp& current_warp() { return g.warps[g.current->index.x / 32]; }

// Records the first error since the last cudaGetLastError.
void set_error(cudaError_t error, const std::string& message) {
  if (g_last_error != cudaSuccess) return;
  g_last_error = error;
  g_last_message = "emulator: " + message;
}

// Stops the launch: records the error and returns to the scheduler, never to the failing thread.
[[noreturn]] void fail(const std::string& message) {
  if (g.error.empty()) g.error = message;
  g.aborted = true;
  swapcontext(&g.current->context, &g.main_context);
  std::abort();  // an aborted fiber is never resumed
}

std::string where() {
  const uint3 t = g.current->index;
  return " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         ", thread " + std::to_string(t.x) + ")";
}

void open(Barrier& b) {
  b.arrived = 0;
  b.site = nullptr;
  ++b.generation;
}

void wait_at(Barrier& b, const void* site, const char* what) {
  if (b.arrived == 0) {
    b.site = site;
  } else if (b.site != site) {
    fail(std::string("threads of one block wait at different ") + what + " call sites" + where());
  }
  if (++b.arrived == b.expected) {
    open(b);
    return;
  }
  Fiber& f = *g.current;
  f.state = State::Waiting;
  f.waiting_on = &b;
  f.wait_generation = b.generation;
  swapcontext(&f.context, &g.main_context);
}

void leave(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) open(b);
}

void fiber_main() {
  (*g.body)();
  Fiber& f = *g.current;
  f.state = State::Done;
  leave(g.block_barrier);
  leave(current_warp().barrier);
}  // returns to uc_link: the scheduler

// Publishes this lane's words for a warp collective of kind `what`, waits for the whole warp, returns the slots.
const uint32_t (*publish(const uint32_t* words, int n, const char* what)) [kSlotWords] {
  Warp& w = current_warp();
  if (w.barrier.expected != 32) fail(std::string(what) + " in a warp with exited or missing lanes" + where());
  const int parity = static_cast<int>(w.barrier.generation & 1u);
  std::memcpy(w.slots[parity][g.current->index.x % 32], words, sizeof(uint32_t) * n);
  wait_at(w.barrier, what, what);
  return w.slots[parity];
}

double half_value(bool bf16, uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * which));  // element 0 in the low half
  if (bf16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// d[c] += sum over k < k_size of A[row][k] B[k][col] for this lane's four accumulators (c0, c1: row g, columns
// 2t, 2t + 1; c2, c3: row g + 8), products exact in double, rounded once to fp32; a(row, k) and b(k, col) read
// the operands out of the lanes' published registers.
template <typename AValue, typename BValue>
void accumulate_mma(float (&d)[4], int k_size, AValue&& a, BValue&& b) {
  const int lane = static_cast<int>(g.current->index.x % 32), gid = lane / 4, tid = lane % 4;
  for (int c = 0; c < 4; ++c) {
    const int row = gid + (c >= 2 ? 8 : 0), col = 2 * tid + (c & 1);
    double acc = d[c];
    for (int k = 0; k < k_size; ++k) acc += a(row, k) * b(k, col);
    d[c] = static_cast<float>(acc);
  }
}

}  // namespace

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || threads < 1 || threads > kMaxThreads) {
    return set_error(cudaErrorInvalidConfiguration, "blocks must be 1-D with 1..1024 threads");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    return set_error(cudaErrorInvalidConfiguration, "grid dimensions out of range");
  }
  g.fibers.resize(threads);
  g.warps.assign((threads + 31) / 32, Warp{});
  g.body = &body;
  g.aborted = false;
  g.error.clear();
  gridDim = grid;
  blockDim = block;
  for (unsigned int bz = 0; bz < grid.z && !g.aborted; ++bz)
    for (unsigned int by = 0; by < grid.y && !g.aborted; ++by)
      for (unsigned int bx = 0; bx < grid.x && !g.aborted; ++bx) {
        blockIdx = make_uint3(bx, by, bz);
        g.block_barrier = Barrier{threads};
        for (size_t w = 0; w < g.warps.size(); ++w) {
          const int lanes = threads - 32 * static_cast<int>(w);
          g.warps[w].barrier = Barrier{lanes < 32 ? lanes : 32};
        }
        for (int t = 0; t < threads; ++t) {
          Fiber& f = g.fibers[t];
          if (!f.stack) f.stack = std::make_unique<char[]>(kStackBytes);
          f.index = make_uint3(static_cast<unsigned int>(t), 0, 0);
          f.state = State::Ready;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &g.main_context;
          makecontext(&f.context, fiber_main, 0);
        }
        for (;;) {
          bool ran = false, all_done = true;
          int waiting_block = 0, waiting_warp = 0;
          for (int i = 0; i < threads; ++i) {
            Fiber& f = g.fibers[g_reverse_order ? threads - 1 - i : i];
            if (f.state == State::Done) continue;
            all_done = false;
            if (f.state == State::Waiting && f.waiting_on->generation == f.wait_generation) {
              (f.waiting_on == &g.block_barrier ? waiting_block : waiting_warp) += 1;
              continue;
            }
            f.state = State::Ready;
            g.current = &f;
            threadIdx = f.index;
            swapcontext(&g.main_context, &f.context);
            ran = true;
            if (g.aborted) break;
          }
          if (all_done || g.aborted) break;
          if (!ran) {
            g.error = "deadlock in block " + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                      ": " + std::to_string(waiting_block) + " threads wait at __syncthreads, " +
                      std::to_string(waiting_warp) + " at a warp collective, and no thread can go on";
            g.aborted = true;
          }
        }
      }
  if (g.aborted) set_error(cudaErrorLaunchFailure, g.error);
  g.current = nullptr;
}

void sync_block() { wait_at(g.block_barrier, __builtin_return_address(0), "__syncthreads"); }

uint32_t warp_exchange(uint32_t value, int source) {
  const auto slots = publish(&value, 1, "__shfl_sync");
  return slots[source & 31][0];
}

void mma_m16n8k16(bool bf16, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                  uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const auto slots = publish(mine, 6, bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16");
  // A[row][k]: lane (row % 8, (k % 8) / 2), register (row >= 8) + 2 (k >= 8), half k % 2.
  // B[k][col]: lane (col, (k % 8) / 2), register 4 + (k >= 8), half k % 2.
  accumulate_mma(
      d, 16,
      [&](int row, int k) {
        return half_value(bf16, slots[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
      },
      [&](int k, int col) { return half_value(bf16, slots[col * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2); });
}

void mma_m16n8k8_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const auto slots = publish(mine, 6, "mma.m16n8k8.tf32");
  // A[row][k]: lane (row % 8, k % 4), register (row >= 8) + 2 (k >= 4); B[k][col]: lane (col, k % 4), register
  // 4 + (k >= 4). The tensor cores read a tf32 operand's top 19 bits.
  const auto tf32 = [](uint32_t bits) { return static_cast<double>(__uint_as_float(bits & 0xFFFFE000u)); };
  accumulate_mma(
      d, 8, [&](int row, int k) { return tf32(slots[(row % 8) * 4 + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]); },
      [&](int k, int col) { return tf32(slots[col * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]); });
}

uint32_t cvt_rna_tf32(float v) {
  const uint32_t u = __float_as_uint(v);
  if ((u & 0x7F800000u) == 0x7F800000u) return (u & 0x007FFFFFu) ? 0x7FFFE000u : u;  // nan / inf
  return (u + 0x1000u) & 0xFFFFE000u;  // magnitude + half an ulp, truncated: ties away from zero
}

float unsupported(const char* what) {
  if (g.current != nullptr) fail(std::string("not emulated: ") + what + where());
  return 0.0f;
}

const char* last_error_message() { return g_last_message.c_str(); }

void set_reverse_order(bool reverse) { g_reverse_order = reverse; }

}  // namespace qpeft_emu

// The kernels' launchers return cudaGetLastError(): the first error of the launches since the last call.
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = qpeft_emu::g_last_error;
  qpeft_emu::g_last_error = cudaSuccess;
  return e;
}
