/* mbkernel: a freestanding multiboot v1 kernel for minivmm and QEMU's -kernel.
 *
 * It prints through COM1 what the platform gives it, then reports through
 * isa-debug-exit (port 0xf4): the multiboot info (Multiboot 0.6.96 section 3.3:
 * command line, memory, modules), fw_cfg (QEMU docs/specs/fw_cfg.rst: signature,
 * CPU count, RAM size), the ACPI tables (ACPI 6.5 section 5.2: RSDP in
 * 0xE0000-0xFFFFF, RSDT, FADT and its PM timer, MADT and its processor local APIC
 * entries), and starts the other CPUs with INIT-SIPI-SIPI through the local APIC
 * (SDM vol. 3A 8.4.4.1). Each AP increments a counter and halts.
 *
 * Exit code: the number of CPUs running when fw_cfg, the MADT and the started
 * APs agree, else 0x40 | that number; 0x11 for a bad boot magic.
 * Every CPL-0 loop here is bounded and short: the host may emulate it. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4
#define FW_CFG_SELECTOR 0x510
#define FW_CFG_DATA 0x511
#define LAPIC 0xFEE00000u
#define LAPIC_ICR_LOW (LAPIC + 0x300)
#define LAPIC_ICR_HIGH (LAPIC + 0x310)
#define TRAMPOLINE 0x70000u
#define MAX_CPUS 8

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4], mmap_length, mmap_addr;
};
struct mb_module { u32 start, end, string, reserved; };

extern char ap_trampoline[], ap_trampoline_end[];
volatile u32 ap_count;
volatile u32 ap_ids;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read(u32 a) { return *(volatile u32 *)a; }
static inline void mmio_write(u32 a, u32 v) { *(volatile u32 *)a = v; }

void *memcpy(void *d, const void *s, unsigned n) {
    u8 *dp = d; const u8 *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}
void *memset(void *d, int c, unsigned n) {
    u8 *dp = d;
    while (n--) *dp++ = (u8)c;
    return d;
}

static void putc(char c) { outb(COM1, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putdec(u32 v) {
    char buf[11]; int i = 10; buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}
static void puthex(u32 v) {
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4) putc("0123456789abcdef"[(v >> shift) & 15]);
}
static void putn(const char *s, u32 n) {   /* n bytes, non-printables as '.' */
    for (u32 i = 0; i < n; i++) putc(s[i] >= 32 && s[i] < 127 ? s[i] : '.');
}
static int memeq(const void *a, const void *b, u32 n) {
    const u8 *x = a, *y = b;
    for (u32 i = 0; i < n; i++) if (x[i] != y[i]) return 0;
    return 1;
}
static u8 sum(const void *p, u32 n) {
    const u8 *b = p; u8 s = 0;
    for (u32 i = 0; i < n; i++) s += b[i];
    return s;
}
static void __attribute__((noreturn)) finish(u32 code) {
    outb(DEBUG_EXIT, (u8)code);
    for (;;) __asm__ volatile("cli; hlt");
}

/* -- fw_cfg ------------------------------------------------------------------ */
static void fw_cfg_read(u16 key, void *buf, u32 n) {
    outw(FW_CFG_SELECTOR, key);
    for (u32 i = 0; i < n; i++) ((u8 *)buf)[i] = inb(FW_CFG_DATA);
}

/* -- ACPI ---------------------------------------------------------------------- */
struct sdt { char sig[4]; u32 length; u8 revision, checksum; char oem[6], table[8]; u32 oem_rev, creator, creator_rev; };

static const struct sdt *table_at(u32 address, const char *sig) {
    const struct sdt *t = (const struct sdt *)address;
    if (!address || !memeq(t->sig, sig, 4) || t->length < sizeof(struct sdt) || t->length > 0x10000) return 0;
    if (sum(t, t->length)) { puts("acpi: bad checksum in "); putn(sig, 4); puts("\n"); return 0; }
    return t;
}

static u32 find_rsdp(void) {
    for (u32 a = 0xE0000; a < 0x100000; a += 16)
        if (memeq((const void *)a, "RSD PTR ", 8) && sum((const void *)a, 20) == 0) return a;
    return 0;
}

/* -- SMP ------------------------------------------------------------------------ */
void ap_main(u32 apic_id) {
    __atomic_fetch_add(&ap_count, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_or(&ap_ids, 1u << (apic_id & 31), __ATOMIC_SEQ_CST);
}

static void wait_icr_idle(void) {
    for (u32 i = 0; i < 1000 && (mmio_read(LAPIC_ICR_LOW) & (1u << 12)); i++) ;
}

static void send_ipi(u32 apic_id, u32 low) {
    mmio_write(LAPIC_ICR_HIGH, apic_id << 24);
    mmio_write(LAPIC_ICR_LOW, low);
    wait_icr_idle();
}

static u32 start_aps(const u8 *apic_ids, u32 n, u32 self) {
    memcpy((void *)TRAMPOLINE, ap_trampoline, (u32)(ap_trampoline_end - ap_trampoline));
    mmio_write(LAPIC + 0xF0, mmio_read(LAPIC + 0xF0) | 0x100);   /* SVR: software-enable the LAPIC */
    for (u32 i = 0; i < n; i++) {
        if (apic_ids[i] == self) continue;
        send_ipi(apic_ids[i], 0x00004500);                        /* INIT, assert */
        send_ipi(apic_ids[i], 0x00004600 | (TRAMPOLINE >> 12));   /* STARTUP */
        send_ipi(apic_ids[i], 0x00004600 | (TRAMPOLINE >> 12));   /* STARTUP again, per the SDM */
    }
    for (u32 i = 0; i < 3000000 && ap_count < n - 1; i++) ;
    return ap_count;
}

void kmain(u32 magic, const struct mb_info *mbi) {
    puts("mbkernel: booted\n");
    if (magic != 0x2BADB002) { puts("mbkernel: bad magic "); puthex(magic); puts("\n"); finish(0x11); }
    if (mbi->flags & (1 << 2)) { puts("cmdline: "); puts((const char *)mbi->cmdline); puts("\n"); }
    if (mbi->flags & 1) { puts("memory: lower "); putdec(mbi->mem_lower); puts(" KiB, upper ");
                          putdec(mbi->mem_upper); puts(" KiB\n"); }
    if (mbi->flags & (1 << 3)) {
        const struct mb_module *mods = (const struct mb_module *)mbi->mods_addr;
        for (u32 i = 0; i < mbi->mods_count; i++) {
            u32 size = mods[i].end - mods[i].start;
            puts("module "); putdec(i); puts(": "); putdec(size); puts(" bytes at "); puthex(mods[i].start);
            puts(" '"); puts(mods[i].string ? (const char *)mods[i].string : ""); puts("' data '");
            putn((const char *)mods[i].start, size < 32 ? size : 32); puts("'\n");
        }
    }

    char sig[4];
    u16 fw_cpus = 0;
    fw_cfg_read(0x0000, sig, 4);
    if (memeq(sig, "QEMU", 4)) {
        u64 ram = 0;
        fw_cfg_read(0x0005, &fw_cpus, 2);
        fw_cfg_read(0x0003, &ram, 8);
        puts("fw_cfg: signature QEMU, cpus "); putdec(fw_cpus); puts(", ram "); putdec((u32)(ram >> 20));
        puts(" MiB\n");
    } else {
        puts("fw_cfg: none\n");
    }

    u32 madt_cpus = 0, pm_timer = 0, self_id = 0;
    u8 apic_ids[MAX_CPUS];
    u32 rsdp = find_rsdp();
    if (!rsdp) {
        puts("acpi: no RSDP\n");
    } else {
        const struct sdt *rsdt = table_at(*(const u32 *)(rsdp + 16), "RSDT");
        puts("acpi: RSDP at "); puthex(rsdp); puts(rsdt ? ", RSDT ok\n" : ", no valid RSDT\n");
        u32 entries = rsdt ? (rsdt->length - sizeof(struct sdt)) / 4 : 0;
        for (u32 i = 0; i < entries; i++) {
            u32 address = ((const u32 *)(rsdt + 1))[i];
            const struct sdt *t;
            if ((t = table_at(address, "FACP"))) {
                pm_timer = *(const u32 *)((const u8 *)t + 76);
                puts("acpi: FADT, PM timer at "); puthex(pm_timer); puts("\n");
            } else if ((t = table_at(address, "APIC"))) {
                const u8 *p = (const u8 *)t + 44, *end = (const u8 *)t + t->length;
                u32 ioapics = 0;
                for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
                    if (p[0] == 0 && (*(const u32 *)(p + 4) & 1) && madt_cpus < MAX_CPUS)
                        apic_ids[madt_cpus++] = p[3];
                    if (p[0] == 1) ioapics++;
                }
                puts("acpi: MADT, "); putdec(madt_cpus); puts(" cpus, "); putdec(ioapics); puts(" ioapic\n");
            }
        }
    }

    if (pm_timer) {
        u32 first = inl((u16)pm_timer), later = first;
        for (u32 i = 0; i < 1000 && later == first; i++) later = inl((u16)pm_timer);
        puts(later != first ? "pm timer: advancing\n" : "pm timer: stuck\n");
    }

    u32 started = 0;
    if (madt_cpus > 1) {
        self_id = mmio_read(LAPIC + 0x20) >> 24;
        started = start_aps(apic_ids, madt_cpus, self_id);
        puts("smp: "); putdec(started); puts(" of "); putdec(madt_cpus - 1); puts(" APs started\n");
    }
    u32 online = 1 + started;
    u32 agree = fw_cpus == madt_cpus && madt_cpus == online;
    puts(agree ? "mbkernel: ok, " : "mbkernel: mismatch, "); putdec(online); puts(" cpus online\n");
    finish(agree ? online : 0x40 | online);
}
