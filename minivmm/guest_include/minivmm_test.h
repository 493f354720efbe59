/*
 * minivmm_test.h: the guest side of minivmm's test channel for freestanding C
 * (gcc -ffreestanding -nostdlib, -m64 or -m32). Header-only.
 *
 *   GUEST_SYNC(stage, value)   pause: the run returns to the test ("sync");
 *                              returns the host's reply (its RAX, 0 by default)
 *   GUEST_ASSERT(cond)         fail the pytest test with file, line, expression
 *   GUEST_ASSERT_EQ(a, b)      ... and both values (as 64-bit integers)
 *   GUEST_ASSERT_NE(a, b)
 *   GUEST_PRINTF(fmt, ...)     formatted by the host into the test output:
 *                              %d %i %u %x %X %o %c %s %p %%, flags, width,
 *                              precision (also `*`), h hh l ll z j t
 *   GUEST_DONE()               the test passed; never returns
 *
 * Unless MINIVMM_NO_START is defined, the header also defines `_start`, which
 * aligns the stack, calls `void guest_main(void)` and then GUEST_DONE(): a
 * test guest defines guest_main() only.
 *
 * Hypercalls: `out %al, $0xf5`, number in EAX, arguments in (E/R)BX, CX, DX,
 * SI, result in (E/R)AX; numbers 0x4d560000 + n (see guest_test.inc).
 */
#ifndef MINIVMM_TEST_H
#define MINIVMM_TEST_H

#include <stdarg.h>
#include <stdint.h>

#define MV_HYPERCALL_PORT 0xf5
#define MV_HC_BASE   0x4d560000u
#define MV_HC_DONE   (MV_HC_BASE + 0)
#define MV_HC_SYNC   (MV_HC_BASE + 1)
#define MV_HC_ASSERT (MV_HC_BASE + 2)
#define MV_HC_PRINTF (MV_HC_BASE + 3)

#define MV_ASSERT_MAGIC 0x5241564du              /* "MVAR" */
#define MV_KIND_COND 1u
#define MV_KIND_EQ 2u
#define MV_KIND_NE 3u
#define MV_FLAG_VALUES_IN_MEMORY 0x100u
#define MV_PRINTF_MAX_ARGS 16

/* A pointer stored in a 64-bit slot, for -m32 and -m64 alike. */
typedef union { const void *p; uint64_t u; } mv_ptr64;

/* The record a failing assertion passes (layout shared with guest_test.inc). */
struct mv_assert_record {
    uint32_t magic;
    uint32_t flags;               /* kind | MV_FLAG_* */
    mv_ptr64 file;
    uint64_t line;
    mv_ptr64 expression;
    mv_ptr64 site;                /* 0: use RIP at the report */
};

static inline unsigned long mv_hypercall(unsigned long nr, unsigned long b, unsigned long c,
                                         unsigned long d, unsigned long s)
{
    unsigned long ret;
    __asm__ volatile("outb %%al, %[port]"
                     : "=a"(ret), "+b"(b), "+c"(c), "+d"(d), "+S"(s)
                     : "0"(nr), [port] "N"(MV_HYPERCALL_PORT)
                     : "memory");
    return ret;
}

static inline unsigned long GUEST_SYNC(unsigned long stage, unsigned long value)
{
    return mv_hypercall(MV_HC_SYNC, stage, value, 0, 0);
}

__attribute__((noreturn)) static inline void GUEST_DONE(void)
{
    mv_hypercall(MV_HC_DONE, 0, 0, 0, 0);
    for (;;)
        __asm__ volatile("" ::: "memory");
}

/* Inlined, so that RIP at the report is the assertion's own code. */
__attribute__((always_inline)) static inline void
mv_assert_failed(const struct mv_assert_record *record, uint64_t left, uint64_t right)
{
    volatile uint64_t values[2] = { left, right };
    mv_hypercall(MV_HC_ASSERT, (unsigned long)record, 0, 0, (unsigned long)values);
}

#define MV_ASSERT_RECORD_(kind, text)                                                       \
    static const struct mv_assert_record mv_record_ = {                                   \
        MV_ASSERT_MAGIC, (kind) | MV_FLAG_VALUES_IN_MEMORY, { .p = __FILE__ }, __LINE__,   \
        { .p = (text) }, { .p = 0 } }

#define GUEST_ASSERT(cond)                                                                 \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            MV_ASSERT_RECORD_(MV_KIND_COND, #cond);                                        \
            mv_assert_failed(&mv_record_, 0, 0);                                           \
        }                                                                                  \
    } while (0)

#define MV_ASSERT_CMP_(kind, op, a, b)                                                      \
    do {                                                                                   \
        uint64_t mv_a_ = (uint64_t)(a), mv_b_ = (uint64_t)(b);                             \
        if (!(mv_a_ op mv_b_)) {                                                           \
            MV_ASSERT_RECORD_(kind, #a " " #op " " #b);                                    \
            mv_assert_failed(&mv_record_, mv_a_, mv_b_);                                   \
        }                                                                                  \
    } while (0)

#define GUEST_ASSERT_EQ(a, b) MV_ASSERT_CMP_(MV_KIND_EQ, ==, a, b)
#define GUEST_ASSERT_NE(a, b) MV_ASSERT_CMP_(MV_KIND_NE, !=, a, b)

/* Collects the arguments the format names into 64-bit slots (signed ones
 * sign-extended); the host does the formatting. */
static inline void mv_vprintf(const char *format, va_list ap)
{
    uint64_t args[MV_PRINTF_MAX_ARGS];
    unsigned long count = 0;
    const char *p = format;
    while (*p && count < MV_PRINTF_MAX_ARGS) {
        if (*p++ != '%')
            continue;
        if (*p == '%') {
            p++;
            continue;
        }
        while (*p == '-' || *p == '+' || *p == ' ' || *p == '#' || *p == '0')
            p++;
        if (*p == '*') {
            args[count++] = (uint64_t)(int64_t)va_arg(ap, int);
            p++;
        }
        while (*p >= '0' && *p <= '9')
            p++;
        if (*p == '.') {
            p++;
            if (*p == '*' && count < MV_PRINTF_MAX_ARGS) {
                args[count++] = (uint64_t)(int64_t)va_arg(ap, int);
                p++;
            }
            while (*p >= '0' && *p <= '9')
                p++;
        }
        int longs = 0;
        for (;; p++) {
            if (*p == 'l' || *p == 'z' || *p == 'j' || *p == 't')
                longs++;
            else if (*p != 'h')
                break;
        }
        if (count >= MV_PRINTF_MAX_ARGS)
            break;
        switch (*p) {
        case 'd': case 'i': case 'c':
            args[count++] = longs >= 2 ? (uint64_t)va_arg(ap, long long)
                          : longs ? (uint64_t)(int64_t)va_arg(ap, long)
                                  : (uint64_t)(int64_t)va_arg(ap, int);
            break;
        case 'u': case 'x': case 'X': case 'o':
            args[count++] = longs >= 2 ? (uint64_t)va_arg(ap, unsigned long long)
                          : longs ? (uint64_t)va_arg(ap, unsigned long)
                                  : (uint64_t)va_arg(ap, unsigned int);
            break;
        case 's': case 'p':
            args[count++] = (uint64_t)(uintptr_t)va_arg(ap, const void *);
            break;
        default:
            break;
        }
        if (*p)
            p++;
    }
    mv_hypercall(MV_HC_PRINTF, (unsigned long)format, (unsigned long)args, count | (8ul << 8), 0);
}

__attribute__((format(printf, 1, 2))) static inline void GUEST_PRINTF(const char *format, ...)
{
    va_list ap;
    va_start(ap, format);
    mv_vprintf(format, ap);
    va_end(ap);
}

#ifndef MINIVMM_NO_START
void guest_main(void);

#if defined(__x86_64__)
__asm__(".pushsection .text._start, \"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "    and $-16, %rsp\n"
        "    call guest_main\n"
        "    mov $0x4d560000, %eax\n"
        "    out %al, $0xf5\n"
        "1:  jmp 1b\n"
        ".popsection\n");
#else
__asm__(".pushsection .text._start, \"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "    and $-16, %esp\n"
        "    call guest_main\n"
        "    mov $0x4d560000, %eax\n"
        "    out %al, $0xf5\n"
        "1:  jmp 1b\n"
        ".popsection\n");
#endif
#endif /* MINIVMM_NO_START */

#endif /* MINIVMM_TEST_H */
