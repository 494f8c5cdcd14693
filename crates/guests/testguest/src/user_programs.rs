//! The user programs, in `.user_text`, which every process maps at `process::USER_BASE`. They are written
//! in assembly because they must be position independent (linked at kernel addresses, run at the user
//! base) and must make exactly the system calls a scenario expects: the monitor's events are compared
//! with this list. Each program gets its argument in RDI and ends with `exit`.
//!
//! - `init`: write, getpid (expects pid 1), spawn worker (expects pid 2), spawn intruder, exit(0 or 1).
//! - `worker`: write, getpid, exit(0).
//! - `intruder`: write, exit(0); the process-creation policy will refuse it.
//! - `bench`: RDI times getpid, then exit with its own time-stamp-counter delta over those calls.

core::arch::global_asm!(
    r#"
    .section .user_text, "ax"
    .balign 16
    .global user_init
user_init:
    lea init_msg(%rip), %rdi
    mov $(init_msg_end - init_msg), %esi
    mov $1, %eax                    /* write */
    syscall
    mov $39, %eax                   /* getpid */
    syscall
    mov %rax, %r12
    mov $1, %edi                    /* spawn(worker) */
    mov $57, %eax
    syscall
    mov %rax, %r13
    mov $2, %edi                    /* spawn(intruder) */
    mov $57, %eax
    syscall
    xor %edi, %edi
    cmp $1, %r12
    jne 1f
    cmp $2, %r13
    je 2f
1:  mov $1, %edi
2:  mov $60, %eax                   /* exit */
    syscall
    ud2
init_msg: .ascii "init: hello from user mode"
init_msg_end:

    .balign 16
    .global user_worker
user_worker:
    lea worker_msg(%rip), %rdi
    mov $(worker_msg_end - worker_msg), %esi
    mov $1, %eax
    syscall
    mov $39, %eax
    syscall
    xor %edi, %edi
    mov $60, %eax
    syscall
    ud2
worker_msg: .ascii "worker: running"
worker_msg_end:

    .balign 16
    .global user_intruder
user_intruder:
    lea intruder_msg(%rip), %rdi
    mov $(intruder_msg_end - intruder_msg), %esi
    mov $1, %eax
    syscall
    xor %edi, %edi
    mov $60, %eax
    syscall
    ud2
intruder_msg: .ascii "intruder: running"
intruder_msg_end:

    .balign 16
    .global user_bench
user_bench:
    mov %rdi, %rbx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
1:  test %rbx, %rbx
    jz 2f
    mov $39, %eax
    syscall
    dec %rbx
    jmp 1b
2:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r12, %rax
    mov %rax, %rdi
    mov $60, %eax
    syscall
    ud2
"#,
    options(att_syntax)
);
