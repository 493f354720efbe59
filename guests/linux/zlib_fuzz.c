/* A libFuzzer-style harness around zlib's uncompress (Debian zlib1g-dev's static libz.a)
   with a bug planted in the harness, for minivmm's binary-only fuzzing of Linux programs.

   The bug: the harness trusts the decompressed bytes (and ignores uncompress's result).
   Output that starts with "BU" followed by a non-zero byte k writes table[k << 20], far
   outside the table: a page fault at that store. Each matched byte is its own branch, so
   coverage leads the fuzzer there one byte at a time.

   main() reads one input from stdin (or the file named by argv[1]) into fuzz_input and
   calls LLVMFuzzerTestOneInput once, so a crash replays with `minivmm linux`. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static volatile int table[16];
unsigned char fuzz_input[1 << 16];

__attribute__((noinline)) int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned char out[512];
    uLongf length = sizeof out;
    int rc = uncompress(out, &length, data, size);
    (void)rc;                        /* the harness's mistake: it looks at `out` whatever rc says */
    if (length >= 3 && out[0] == 'B') {
        if (out[1] == 'U') {
            table[out[2] << 20] = 1;         /* planted: out of bounds unless out[2] == 0 */
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    FILE *f = argc > 1 ? fopen(argv[1], "rb") : stdin;
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    size_t n = fread(fuzz_input, 1, sizeof fuzz_input, f);
    LLVMFuzzerTestOneInput(fuzz_input, n);
    printf("ok: %zu bytes\n", n);
    return 0;
}
