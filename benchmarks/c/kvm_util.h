/* Helpers shared by the C baselines: fatal errors, checked ioctls, a monotonic clock.
 * Include after defining _GNU_SOURCE (for program_invocation_short_name). */
#ifndef MINIVMM_BENCH_KVM_UTIL_H
#define MINIVMM_BENCH_KVM_UTIL_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

static inline void die(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what, strerror(errno));
	exit(1);
}

static inline int checked_ioctl(int fd, unsigned long request, void *arg, const char *name)
{
	int result = ioctl(fd, request, arg);
	if (result < 0)
		die(name);
	return result;
}

static inline double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

#endif
