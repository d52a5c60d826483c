// kernels/emu/fiber_switch.h — the emulator's x86-64 context switch (runtime.cpp includes it once,
// where it switches fibers; elsewhere, or with -DEMU_USE_UCONTEXT, the runtime uses swapcontext).
// Saves only the callee-saved registers: no signal mask (no system call) and no MXCSR / x87 control
// word, which kernels never change; resumes with an indirect jump rather than `ret`.
#ifndef SAFEDPO_EMU_FIBER_SWITCH_H
#define SAFEDPO_EMU_FIBER_SWITCH_H
#ifndef EMU_UCONTEXT
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_start();
// emu_fiber_switch saves the callee-saved state of the running context on its stack, stores the stack
// pointer through `save_sp`, and resumes the context saved at `load_sp` (popping its return address
// into rax, which the ABI lets a void function clobber). emu_fiber_start is where a new fiber's first
// switch lands: it calls the entry function kept in r12.
asm(R"(
    .pushsection .text
    .p2align 4
    .globl emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    popq %rax
    jmpq *%rax
    .size emu_fiber_switch, .-emu_fiber_switch

    .p2align 4
    .globl emu_fiber_start
    .hidden emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    callq *%r12
    ud2
    .size emu_fiber_start, .-emu_fiber_start
    .popsection
)");
#endif

#endif  // SAFEDPO_EMU_FIBER_SWITCH_H
