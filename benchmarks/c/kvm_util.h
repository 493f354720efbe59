/* Helpers shared by the C baselines: fatal errors, checked ioctls, a monotonic clock, reading a file.
 * Include after defining _GNU_SOURCE (for program_invocation_short_name). */
#ifndef MINIVMM_BENCH_KVM_UTIL_H
#define MINIVMM_BENCH_KVM_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

/* The whole file at `path` in a malloc'd buffer (exits on error); its size in *size. */
static inline void *read_file(const char *path, size_t *size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;

	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	void *data = malloc(st.st_size ? (size_t)st.st_size : 1);
	if (!data)
		die("malloc");
	size_t done = 0;
	while (done < (size_t)st.st_size) {
		ssize_t n = read(fd, (char *)data + done, (size_t)st.st_size - done);
		if (n <= 0)
			die(path);
		done += (size_t)n;
	}
	close(fd);
	*size = done;
	return data;
}

#endif
