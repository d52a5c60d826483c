// kernels/emu/racecheck.h — what the emulator's runtime (runtime.cpp) tells its shared-memory race
// detector (racecheck.cpp), and the detector's switch. Kernels never include this file.
//
// Each kernel file is compiled for the emulated device twice (build.rs): plainly, and with
// `-fsanitize=thread`, for which the compiler calls `__tsan_read4(addr)`, `__tsan_write8(addr)`, …
// before every load and store (nvcc never sees the flag, so the GPU build is unchanged). While the
// detector is on, the runtime launches the second copy. racecheck.cpp defines the hooks itself (no
// ThreadSanitizer runtime is linked): an address outside the launched kernel's shared memory costs a
// call and two comparisons; one inside is checked against a shadow record per 4-byte word. The calls
// are what costs: every float register is caller-saved, so the checked copy runs 3-5x slower (the
// golden emulated-device tests take about 4.5x their time), hence a copy of its own.
//
// Happens-before from a sequence number. Every synchronising event of the block (the block's start,
// a `__syncthreads` opening, the completion of a warp collective or `__syncwarp`) increments `seq`;
// an access remembers the `seq` current when it ran. A later access by another thread is ordered
// after it when a barrier opened since (`seq_at_access < block_synced`), or when both threads are
// in one warp and a warp collective that took both lanes completed since. Anything else is a race.
#ifndef SAFEDPO_EMU_RACECHECK_H
#define SAFEDPO_EMU_RACECHECK_H

#include <cstddef>
#include <cstdint>

namespace emu_racecheck {

/// Off unless the environment says `SAFEDPO_EMU_RACECHECK=1`; the Rust side switches it (the test mode
/// turns it on).
extern bool enabled;
/// The linear index (within the block) of the thread now running; set by the scheduler at each resume.
extern unsigned current_tid;

/// A launch starts: the kernel's static `__shared__` section and its dynamic shared memory.
void begin_launch(char* static_begin, char* static_end, unsigned char* dyn, size_t dyn_bytes, unsigned nthreads);
/// The launch ended (or failed): no address is shared memory any more.
void end_launch();
/// A block starts: everything before it is ordered before everything in it.
void begin_block();
/// A `__syncthreads` opened.
void barrier();
/// A warp operation of warp `warp` completed for `lanes`; `whole_warp` when those are all its live lanes.
void warp_sync(unsigned warp, unsigned lanes, bool whole_warp);

}  // namespace emu_racecheck

#endif  // SAFEDPO_EMU_RACECHECK_H
