/* Behaviours of minivmm's Linux personality that the busybox comparisons do not reach,
   one per argv[1]: faults, page rights, the memory limit, unknown calls, one process. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char constant[] = "read-only data";

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "write-rodata")) {
        ((volatile char *)constant)[0] = 'X';         /* SIGSEGV */
        return 0;
    }
    if (!strcmp(what, "prot-none")) {
        volatile char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        page[0] = 1;
        mprotect((void *)page, 4096, PROT_NONE);
        printf("before\n");
        fflush(stdout);
        return page[0];                                   /* SIGSEGV */
    }
    if (!strcmp(what, "null")) {
        return *(volatile int *)0;
    }
    if (!strcmp(what, "abort")) {
        abort();
    }
    if (!strcmp(what, "hog")) {
        int n = 0;
        while (malloc(1 << 20) != NULL)
            n++;
        printf("allocated %d MiB\n", n);
        return 1;
    }
    if (!strcmp(what, "unknown")) {
        long a = syscall(999), b = syscall(999);
        printf("%ld %ld %d\n", a, b, errno);
        pid_t child = fork();
        printf("fork=%d errno=%d\n", child, errno);
        return 0;
    }
    if (!strcmp(what, "random")) {
        unsigned char buf[8];
        getrandom(buf, sizeof buf, 0);
        for (int i = 0; i < 8; i++)
            printf("%02x", buf[i]);
        printf(" %ld\n", (long)time(NULL));
        return 0;
    }
    fprintf(stderr, "usage: misc write-rodata|prot-none|null|abort|hog|unknown|random\n");
    return 2;
}
