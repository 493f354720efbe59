/*
 * Native baseline for the fuzz benchmark: the target routine itself, called in a loop
 * on the host (no VM), with the input copied in before each call.
 *
 * usage: fuzz_native IMAGE LOAD_ADDRESS FUNCTION INPUT_ADDRESS INPUT SECONDS
 *
 * IMAGE is the guest image as loaded at LOAD_ADDRESS (code and data, position
 * independent within itself: the routine reaches its data RIP-relative). It is
 * mapped executable at any host address; FUNCTION and INPUT_ADDRESS are guest
 * addresses inside it. The routine takes the input length in RSI (the second
 * argument of the SysV ABI) and clobbers only caller-saved registers. Prints
 *   runs=<n> seconds=<s> rate=<calls per second>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvm_util.h"

typedef uint64_t (*routine)(uint64_t unused, uint64_t length);

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s IMAGE LOAD_ADDRESS FUNCTION INPUT_ADDRESS INPUT SECONDS\n", argv[0]);
		return 1;
	}
	size_t image_size, input_size;
	uint8_t *image = read_file(argv[1], &image_size);
	uint64_t load = strtoull(argv[2], NULL, 0), function = strtoull(argv[3], NULL, 0);
	uint64_t input_address = strtoull(argv[4], NULL, 0);
	uint8_t *input = read_file(argv[5], &input_size);
	double seconds = atof(argv[6]);
	if (function < load || function >= load + image_size || input_address < load ||
	    input_address + input_size > load + image_size) {
		fprintf(stderr, "fuzz_native: function or input outside the image\n");
		return 1;
	}
	uint8_t *code = mmap(NULL, image_size, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (code == MAP_FAILED)
		die("mmap");
	memcpy(code, image, image_size);
	routine call = (routine)(void *)(code + (function - load));
	uint8_t *buffer = code + (input_address - load);

	uint64_t runs = 0;
	double start = now_s(), deadline = start + seconds, stop;
	for (;;) {
		memcpy(buffer, input, input_size);
		call(0, input_size);
		runs++;
		if ((runs & 63) == 0 && (stop = now_s()) >= deadline)
			break;
	}
	stop = now_s();
	printf("runs=%llu seconds=%.6f rate=%.1f\n", (unsigned long long)runs, stop - start,
	       (double)runs / (stop - start));
	return 0;
}
