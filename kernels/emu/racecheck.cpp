// kernels/emu/racecheck.cpp — the emulated device's shared-memory race detector (the emulator's
// answer to compute-sanitizer's racecheck), and the `__tsan_*` hooks that feed it. How accesses
// reach it and how it orders them: racecheck.h.
//
// Shadow state, one record per 4-byte word of the launch's shared memory (static section first,
// then the dynamic shared memory): the last write and up to two reads since, each with its thread,
// the `seq` it ran at, the bytes of the word it touched (so two threads writing the two bf16 halves
// of a word do not conflict) and the code address, for the report. A write checks the last write
// and the reads; a read checks the last write. Two read slots suffice to catch a write-after-read:
// they always hold different threads, so for any writer at least one of them is another thread.
// Records are never cleared between blocks or launches: `seq` only grows, so an old record is
// ordered before everything that follows (the shadow is reset only if `seq` nears overflow).
//
// A race stops the launch with an error: the kernel, block and thread (from the runtime), the kind
// (read after write, write after read, write after write), the word's offset in static or dynamic
// shared memory with the `__shared__` variable's name where the symbol table has it, the other
// thread, and both code addresses (`addr2line -Cfie <binary> <offset>` turns them into lines).
#include "racecheck.h"

#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu.h"

namespace emu_racecheck {

bool enabled = [] {
    const char* v = getenv("SAFEDPO_EMU_RACECHECK");
    return v && *v && strcmp(v, "0") != 0 && strcmp(v, "false") != 0 && strcmp(v, "off") != 0;
}();
unsigned current_tid = 0;

namespace {

constexpr uint16_t kNoThread = 0xffff;
constexpr unsigned kMaxThreads = 1024;

struct Access {
    uint32_t seq = 0;
    uint16_t tid = kNoThread;
    uint8_t bytes = 0;  // bit i: byte i of the word
    const void* pc = nullptr;
};
struct Word {
    Access write, read_a, read_b;
};

/// The ranges the hooks test; both empty outside a launch or with the detector off.
struct Ranges {
    uintptr_t static_lo = 0;
    size_t static_len = 0;
    uintptr_t dyn_lo = 0;
    size_t dyn_len = 0;
};
Ranges ranges;

struct State {
    std::vector<Word> shadow;
    size_t static_words = 0;
    uint32_t seq = 1;
    uint32_t block_synced = 1;                  // seq of the block's last barrier (or its start)
    uint32_t warp_synced[kMaxThreads / 32] = {};  // per warp: seq of its last whole-warp operation
    uint32_t lane_op_seq[kMaxThreads] = {};       // per thread: seq of its last warp operation …
    uint32_t lane_op_mask[kMaxThreads] = {};      // … and the lanes that took part
};
State s;

uint32_t next_seq() {
    return ++s.seq;
}

/// Whether an access by `a` at `seq` is ordered before the current access of thread `b`.
bool ordered(uint32_t seq, unsigned a, unsigned b) {
    if (seq < s.block_synced) return true;
    if (a / 32 != b / 32) return false;
    if (seq < s.warp_synced[b / 32]) return true;
    return seq < s.lane_op_seq[b] && (s.lane_op_mask[b] >> (a % 32) & 1u);
}

bool conflicts(const Access& other, unsigned tid, uint8_t bytes) {
    return other.tid != kNoThread && other.tid != tid && (other.bytes & bytes) && !ordered(other.seq, other.tid, tid);
}

// ---- naming addresses: the ELF symbol table of the object that holds them (error path only) ---------
struct ObjectLookup {
    explicit ObjectLookup(uintptr_t a) : addr(a) {}
    uintptr_t addr;
    std::string file;
    uintptr_t base = 0;
    bool found = false;
};

int find_object(dl_phdr_info* info, size_t, void* data) {
    auto* l = static_cast<ObjectLookup*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && l->addr >= lo && l->addr < lo + ph.p_memsz) {
            l->file = info->dlpi_name && *info->dlpi_name ? info->dlpi_name : "/proc/self/exe";
            if (l->file == "/proc/self/exe") {  // the executable: name it, for addr2line
                char path[4096];
                ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
                if (n > 0) l->file.assign(path, (size_t)n);
            }
            l->base = info->dlpi_addr;
            l->found = true;
            return 1;
        }
    }
    return 0;
}

bool read_at(int fd, void* out, size_t len, off_t at) {
    return pread(fd, out, len, at) == (ssize_t)len;
}

/// The symbol (demangled, without its parameter list) that contains `off` in ELF file `path`, plus
/// the offset into it; empty when the file has no symbol table or no symbol covers it.
std::string symbol_at(const std::string& path, uintptr_t off) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "";
    std::string out;
    ElfW(Ehdr) eh;
    std::vector<ElfW(Shdr)> sh;
    if (read_at(fd, &eh, sizeof eh, 0) && memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0 &&
        eh.e_shentsize == sizeof(ElfW(Shdr))) {
        sh.resize(eh.e_shnum);
        if (!read_at(fd, sh.data(), sh.size() * sizeof(ElfW(Shdr)), (off_t)eh.e_shoff)) sh.clear();
    }
    for (const ElfW(Shdr)& tab : sh) {
        if (tab.sh_type != SHT_SYMTAB || tab.sh_link >= sh.size()) continue;
        std::vector<ElfW(Sym)> syms(tab.sh_size / sizeof(ElfW(Sym)));
        const ElfW(Shdr)& str = sh[tab.sh_link];
        std::vector<char> names(str.sh_size + 1, '\0');
        if (!read_at(fd, syms.data(), syms.size() * sizeof(ElfW(Sym)), (off_t)tab.sh_offset) ||
            !read_at(fd, names.data(), str.sh_size, (off_t)str.sh_offset))
            break;
        for (const ElfW(Sym)& sym : syms) {
            if (sym.st_size == 0 || off < sym.st_value || off >= sym.st_value + sym.st_size ||
                sym.st_name >= str.sh_size)
                continue;
            const char* mangled = names.data() + sym.st_name;
            int status = 0;
            char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
            std::string name = status == 0 && demangled ? demangled : mangled;
            free(demangled);
            const std::string anon = "(anonymous namespace)::";
            for (size_t at; (at = name.find(anon)) != std::string::npos;) name.erase(at, anon.size());
            // `f<float, 64>(float*, …)::k_tile` → `f<float, 64>(…)::k_tile`
            size_t open_paren = name.find('('), close = open_paren;
            for (size_t depth = 0; close < name.size(); ++close) {
                depth += name[close] == '(';
                if (name[close] == ')' && --depth == 0) break;
            }
            if (close < name.size()) name = name.substr(0, open_paren + 1) + "…" + name.substr(close);
            char buf[32];
            snprintf(buf, sizeof buf, "+0x%zx", (size_t)(off - sym.st_value));
            out = "`" + name + "`" + buf;
            break;
        }
        break;
    }
    close(fd);
    return out;
}

/// `function+0x12 (binary+0x4567)` for a code address.
std::string describe_code(const void* pc) {
    ObjectLookup l(reinterpret_cast<uintptr_t>(pc));
    if (!pc || !dl_iterate_phdr(find_object, &l)) return "an unknown address";
    uintptr_t off = l.addr - l.base;
    std::string sym = symbol_at(l.file, off);
    char buf[64];
    snprintf(buf, sizeof buf, "+0x%zx", (size_t)off);
    return (sym.empty() ? "" : sym + " ") + "(" + l.file + buf + ")";
}

std::string thread_name(unsigned tid) {
    char buf[64];
    unsigned x = blockDim.x, y = blockDim.y;
    snprintf(buf, sizeof buf, "thread (%u,%u,%u)", tid % x, (tid / x) % y, tid / (x * y));
    return buf;
}

[[noreturn]] void report(const char* kind, size_t word, const Access& other, bool other_wrote, bool this_writes,
                         const void* pc) {
    unsigned tid = current_tid;
    std::string where;
    char buf[160];
    if (word < s.static_words) {
        uintptr_t addr = ranges.static_lo + word * 4;
        ObjectLookup l(addr);
        std::string var = dl_iterate_phdr(find_object, &l) ? symbol_at(l.file, addr - l.base) : "";
        snprintf(buf, sizeof buf, "static __shared__ offset %zu", word * 4);
        where = var.empty() ? std::string(buf) : var + " (" + buf + ")";
    } else {
        snprintf(buf, sizeof buf, "dynamic shared memory offset %zu", (word - s.static_words) * 4);
        where = buf;
    }
    bool same_warp = other.tid / 32 == tid / 32;
    std::string msg = std::string("shared-memory race (") + kind + ") on the 4-byte word at " + where + ": " +
                      "this thread " + (this_writes ? "writes" : "reads") + " it at " + describe_code(pc) + "; " +
                      thread_name(other.tid) + (other_wrote ? " wrote" : " read") + " it at " +
                      describe_code(other.pc) + ", with no __syncthreads between" +
                      (same_warp ? " and no __syncwarp or warp collective taking both lanes (same warp)"
                                 : " (different warps)");
    emu_fail(msg.c_str());
}

void check_word(size_t word, uint8_t bytes, bool is_write, const void* pc) {
    Word& w = s.shadow[word];
    const unsigned tid = current_tid;
    const Access now{s.seq, (uint16_t)tid, bytes, pc};
    if (is_write) {
        if (conflicts(w.write, tid, bytes)) report("write after write", word, w.write, true, true, pc);
        if (conflicts(w.read_a, tid, bytes)) report("write after read", word, w.read_a, false, true, pc);
        if (conflicts(w.read_b, tid, bytes)) report("write after read", word, w.read_b, false, true, pc);
        if (w.write.tid == tid && w.write.seq == s.seq) {
            w.write.bytes |= bytes;
            w.write.pc = pc;
        } else {
            w.write = now;
        }
        // the reads of these bytes are now checked against this write instead
        for (Access* r : {&w.read_a, &w.read_b}) {
            r->bytes &= (uint8_t)~bytes;
            if (r->bytes == 0) r->tid = kNoThread;
        }
        return;
    }
    if (conflicts(w.write, tid, bytes)) report("read after write", word, w.write, true, false, pc);
    Access* slot = w.read_a.tid == tid ? &w.read_a : w.read_b.tid == tid ? &w.read_b : nullptr;
    if (slot) {
        slot->bytes = slot->seq < s.block_synced ? bytes : (uint8_t)(slot->bytes | bytes);
        slot->seq = s.seq;
        slot->pc = pc;
    } else if (w.read_a.tid == kNoThread || w.read_a.seq < s.block_synced) {
        w.read_a = now;  // read_a is free or ordered before everything to come
    } else {
        w.read_b = now;  // keeps read_a != read_b
    }
}

__attribute__((noinline)) void check(uintptr_t addr, size_t size, bool is_write, const void* pc) {
    // the static section and the dynamic buffer are 4-byte aligned, so words start at multiples of 4
    const bool in_static = addr - ranges.static_lo < ranges.static_len;
    const size_t off = addr - (in_static ? ranges.static_lo : ranges.dyn_lo);
    const size_t end = std::min(off + size, in_static ? ranges.static_len : ranges.dyn_len);
    const size_t first_word = in_static ? 0 : s.static_words;
    for (size_t w = off / 4; w * 4 < end; ++w) {
        const unsigned lo = (unsigned)(std::max(off, w * 4) - w * 4), hi = (unsigned)(std::min(end, w * 4 + 4) - w * 4);
        check_word(first_word + w, (uint8_t)(((1u << hi) - 1) & ~((1u << lo) - 1)), is_write, pc);
    }
}

inline void access(const void* p, size_t size, bool is_write, const void* pc) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (__builtin_expect(a - ranges.static_lo < ranges.static_len || a - ranges.dyn_lo < ranges.dyn_len, 0))
        check(a, size, is_write, pc);
}

}  // namespace

void begin_launch(char* static_begin, char* static_end, unsigned char* dyn, size_t dyn_bytes, unsigned nthreads) {
    (void)nthreads;
    ranges = Ranges{};
    if (!enabled) return;
    // the static section and the dynamic buffer are at least 4-byte aligned (the largest __shared__
    // alignment and aligned_alloc(256)), so words never straddle two records
    size_t static_len = (size_t)(static_end - static_begin);
    s.static_words = (static_len + 3) / 4;
    size_t words = s.static_words + (dyn_bytes + 3) / 4;
    if (s.seq > 0xf0000000u) {  // restart the clock: forget every record
        s.shadow.assign(s.shadow.size(), Word{});
        s.seq = s.block_synced = 1;
        std::fill(std::begin(s.warp_synced), std::end(s.warp_synced), 0u);
        std::fill(std::begin(s.lane_op_seq), std::end(s.lane_op_seq), 0u);
    }
    if (s.shadow.size() < words) s.shadow.resize(words);
    ranges = Ranges{reinterpret_cast<uintptr_t>(static_begin), static_len, reinterpret_cast<uintptr_t>(dyn), dyn_bytes};
}

void end_launch() { ranges = Ranges{}; }

void begin_block() { s.block_synced = next_seq(); }

void barrier() { s.block_synced = next_seq(); }

void warp_sync(unsigned warp, unsigned lanes, bool whole_warp) {
    if (ranges.static_len == 0 && ranges.dyn_len == 0) return;
    uint32_t seq = next_seq();
    if (whole_warp) s.warp_synced[warp] = seq;
    for (unsigned m = lanes; m; m &= m - 1) {
        unsigned t = warp * 32 + __builtin_ctz(m);
        s.lane_op_seq[t] = seq;
        s.lane_op_mask[t] = lanes;
    }
}

}  // namespace emu_racecheck

// ---- the hooks `-fsanitize=thread` makes the kernel files call ---------------------------------------
// Plain accesses go to the detector; atomics run as atomics (sequentially consistent) and are not
// checked (an atomic never races with another atomic; one racing with a plain access is missed).
#define EMU_RC_HOOKS(N)                                                                                     \
    extern "C" void __tsan_read##N(void* p) {                                                             \
        emu_racecheck::access(p, N, false, __builtin_return_address(0));                                  \
    }                                                                                                     \
    extern "C" void __tsan_write##N(void* p) {                                                            \
        emu_racecheck::access(p, N, true, __builtin_return_address(0));                                   \
    }                                                                                                     \
    extern "C" void __tsan_unaligned_read##N(const void* p) {                                             \
        emu_racecheck::access(p, N, false, __builtin_return_address(0));                                  \
    }                                                                                                     \
    extern "C" void __tsan_unaligned_write##N(void* p) {                                                  \
        emu_racecheck::access(p, N, true, __builtin_return_address(0));                                   \
    }
EMU_RC_HOOKS(1)
EMU_RC_HOOKS(2)
EMU_RC_HOOKS(4)
EMU_RC_HOOKS(8)
EMU_RC_HOOKS(16)
#undef EMU_RC_HOOKS
extern "C" void __tsan_read_range(void* p, unsigned long size) {
    emu_racecheck::access(p, size, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long size) {
    emu_racecheck::access(p, size, true, __builtin_return_address(0));
}
extern "C" void __tsan_init(void) {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit(void) {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

#define EMU_RC_ATOMICS(N, T)                                                                                \
    extern "C" T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    extern "C" void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                   \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                               \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                  \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                  \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                  \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                   \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                 \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                  \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                 \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                               \
    }                                                                                                     \
    extern "C" int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {       \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
    }                                                                                                     \
    extern "C" int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {         \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);            \
    }                                                                                                     \
    extern "C" T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {             \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
        return c;                                                                                         \
    }
EMU_RC_ATOMICS(8, uint8_t)
EMU_RC_ATOMICS(16, uint16_t)
EMU_RC_ATOMICS(32, uint32_t)
EMU_RC_ATOMICS(64, uint64_t)
#undef EMU_RC_ATOMICS
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
