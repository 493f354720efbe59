/* A C program for minivmm's Linux personality tests: argv, environment, heap, stdio on an
   exposed file, mmap/mprotect, time and a computed checksum; the same output natively. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    printf("argc=%d\n", argc);
    for (int i = 1; i < argc; i++)
        printf("argv[%d]=%s\n", i, argv[i]);
    const char *probe = getenv("PROBE");
    printf("PROBE=%s\n", probe ? probe : "(unset)");
    size_t total = 0;
    for (int i = 0; i < 2000; i++) {            /* small and large allocations: brk and mmap */
        char *block = malloc(i % 100 == 0 ? 300000 : 64 + i);
        memset(block, i & 0xff, 64);
        total += (unsigned char)block[10];
        if (i % 3)
            free(block);
    }
    printf("heap=%zu\n", total);
    unsigned char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page[4096] = 42;
    mprotect(page, 4096, PROT_READ);
    printf("mmap=%d first=%d\n", page[4096], page[0]);
    munmap(page, 8192);
    if (argc > 1) {
        FILE *f = fopen(argv[1], "rb");
        if (!f) {
            perror(argv[1]);
            return 3;
        }
        unsigned long sum = 0;
        int c;
        while ((c = fgetc(f)) != EOF)
            sum = sum * 31 + (unsigned)c;
        fclose(f);
        struct stat st;
        stat(argv[1], &st);
        printf("sum=%lu size=%lld\n", sum, (long long)st.st_size);
    }
    char buf[64];
    fprintf(stderr, "cwd ok=%d\n", getcwd(buf, sizeof buf) != NULL);
    return argc > 2 ? atoi(argv[2]) : 0;
}
