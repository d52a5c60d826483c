// kernels/emu/block_window.cpp — block windows of the emulated device: launches of a kernel whose
// name starts with a window's prefix run only the blocks inside its ranges (tests of offsets past
// 2^31 run the far end of a grid too large to run whole). runtime.cpp asks at each launch.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {
struct Window {
    std::string prefix;
    long long lo[3], hi[3];
};

struct Windows {
    std::mutex lock;
    std::vector<Window> list;
    unsigned grid[3] = {0, 0, 0}, block[3] = {0, 0, 0};  // the last windowed launch
    uint64_t launches = 0, blocks = 0;
} g_windows;
}  // namespace

/// Adds a block window: launches of the kernels whose name starts with `prefix` run only the blocks
/// whose index lies in [lo[d], hi[d]) in every dimension d (a negative bound counts from the grid's
/// end: -1 is the last block). The first window whose prefix matches applies.
extern "C" void emu_add_block_window(const char* prefix, const long long lo[3], const long long hi[3]) {
    std::lock_guard<std::mutex> lock(g_windows.lock);
    Window w{prefix, {lo[0], lo[1], lo[2]}, {hi[0], hi[1], hi[2]}};
    g_windows.list.push_back(w);
}

/// Removes every block window and resets the record.
extern "C" void emu_clear_block_windows(void) {
    std::lock_guard<std::mutex> lock(g_windows.lock);
    g_windows.list.clear();
    g_windows.launches = g_windows.blocks = 0;
}

/// The window's record: out = {launches it applied to, blocks those ran, grid x, y, z, block x, y, z
/// of the last such launch}.
extern "C" void emu_block_window_record(uint64_t out[8]) {
    std::lock_guard<std::mutex> lock(g_windows.lock);
    out[0] = g_windows.launches;
    out[1] = g_windows.blocks;
    for (int d = 0; d < 3; ++d) {
        out[2 + d] = g_windows.grid[d];
        out[5 + d] = g_windows.block[d];
    }
}

/// Whether a launch of `name` over `grid` runs only a window (the first whose prefix matches), and
/// if so its bounds, resolved against the grid: blocks with lo[d] <= index < hi[d] in every dimension.
extern "C" bool emu_window_for_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                                      long long lo[3], long long hi[3]) {
    std::lock_guard<std::mutex> lock(g_windows.lock);
    for (int d = 0; d < 3; ++d) lo[d] = 0, hi[d] = grid[d];
    const Window* window = nullptr;
    for (const auto& w : g_windows.list)
        if (strncmp(name, w.prefix.c_str(), w.prefix.size()) == 0) {
            window = &w;
            break;
        }
    if (window == nullptr) return false;
    for (int d = 0; d < 3; ++d) {
        auto resolve = [&](long long v) { return std::clamp(v < 0 ? v + (long long)grid[d] : v, 0LL, (long long)grid[d]); };
        lo[d] = resolve(window->lo[d]);
        hi[d] = resolve(window->hi[d]);
        g_windows.grid[d] = grid[d];
        g_windows.block[d] = block[d];
    }
    ++g_windows.launches;
    return true;
}

/// Counts a block that a window let run.
extern "C" void emu_window_count_block(void) {
    std::lock_guard<std::mutex> lock(g_windows.lock);
    ++g_windows.blocks;
}
