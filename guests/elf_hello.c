/* A freestanding C guest (long mode, CPL 0), built by the config's `build:` step:
 *   gcc -ffreestanding -nostdlib -static ... -Wl,-Ttext-segment=0x100000
 * `_start` receives the text to print in RDI (the config sets rdi: greeting or
 * rdi: buffer, ELF symbols) and reports the number of characters printed as
 * the exit code. */

static inline void outb(unsigned short port, unsigned char value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static int puts_serial(const char *text)
{
    int count = 0;
    while (*text) {
        outb(0x3f8, (unsigned char)*text++);
        count++;
    }
    return count;
}

const char greeting[] = "Hello from C!\n";
char buffer[64];            /* configs/elf_buffer.yaml loads a flat binary here */
volatile int counter;

__attribute__((noreturn)) void _start(const char *message)
{
    int printed = puts_serial(message);
    counter = printed;
    outb(0xf4, (unsigned char)counter);
    for (;;)
        __asm__ volatile("hlt");
}
