// kernels/emu/memory.cpp — device memory of the emulated device: buffers that end at a guard page,
// filled with NaN bytes (or left as zero pages, for tests of offsets past 2^31), and zero fills that
// hand whole pages back instead of writing them.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace {
/// emu_set_lazy_alloc: fresh buffers left as the kernel maps them (zero pages, committed only when
/// touched) instead of filled with NaN bytes.
std::atomic<bool> g_lazy_alloc{false};
}  // namespace

/// Device memory of the emulated device: `capacity` bytes (a multiple of 256, > 0) that end exactly
/// at an inaccessible guard page, so a kernel running off the end of a buffer faults at once; the
/// start is 256-byte aligned like cudaMalloc's. Filled with 0xFF (NaN). Null when out of memory.
extern "C" void* emu_mem_alloc(size_t capacity) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t body = (capacity + page - 1) / page * page;
    void* map = mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (map == MAP_FAILED) return nullptr;
    char* guard = static_cast<char*>(map) + body;
    mprotect(guard, page, PROT_NONE);
    char* ptr = guard - capacity;
    if (!g_lazy_alloc.load(std::memory_order_relaxed)) memset(ptr, 0xff, capacity);
    return ptr;
}

/// Sets `bytes` bytes at `ptr` (inside one emu_mem_alloc buffer) to zero. The whole pages of a large
/// range are handed back to the kernel instead of written (MADV_DONTNEED on a private anonymous
/// mapping: they read as zero and hold no memory until written), so zeroing gigabytes is cheap.
extern "C" void emu_mem_zero(void* ptr, size_t bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    char* begin = static_cast<char*>(ptr);
    char* end = begin + bytes;
    char* first = reinterpret_cast<char*>(((uintptr_t)begin + page - 1) / page * page);
    char* last = reinterpret_cast<char*>((uintptr_t)end / page * page);
    if (bytes < 64 * page || last <= first || madvise(first, last - first, MADV_DONTNEED) != 0) {
        memset(begin, 0, bytes);
        return;
    }
    memset(begin, 0, first - begin);
    memset(last, 0, end - last);
}

/// Fresh buffers filled with NaN bytes (0, the default) or left as zero pages that take memory only
/// where written (nonzero): for tests that address more memory than the machine has.
extern "C" void emu_set_lazy_alloc(int on) { g_lazy_alloc.store(on != 0, std::memory_order_relaxed); }

/// Frees what emu_mem_alloc(capacity) returned.
extern "C" void emu_mem_free(void* ptr, size_t capacity) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t body = (capacity + page - 1) / page * page;
    char* map = static_cast<char*>(ptr) + capacity - body;
    munmap(map, body + page);
}

