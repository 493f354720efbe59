/*
 * Baseline for the start-up benchmark: boot a multiboot v1 kernel whose header carries
 * its load addresses (flags bit 16) the shortest way over /dev/kvm, and stop at its first
 * port write.
 *
 * usage: startup KERNEL MEMORY_BYTES
 *
 * Reads the multiboot header from the first 8 KiB, copies the file to load_addr, zeroes
 * up to bss_end_addr, sets the CPUID table KVM supports, and enters 32-bit protected mode
 * (flat segments, paging off) at entry_addr with EAX = 0x2BADB002 and EBX = a
 * multiboot_info with only the memory fields. Prints `port=<p> value=<v>` for the first
 * KVM_EXIT_IO OUT; any other exit or error prints a message to stderr and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvm_util.h"

#define MB_MAGIC 0x1BADB002u
#define MB_AOUT_KLUDGE (1u << 16)
#define MB_INFO_ADDRESS 0x9000u
#define MAX_CPUID_ENTRIES 128

static uint8_t file_buffer[4u << 20];

static void flat_segment(struct kvm_segment *segment, uint16_t selector, uint8_t type)
{
	*segment = (struct kvm_segment){.base = 0, .limit = 0xffffffff, .selector = selector, .type = type,
					.present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: startup KERNEL MEMORY_BYTES\n");
		return 1;
	}
	size_t memory_size = strtoull(argv[2], NULL, 0);
	FILE *file = fopen(argv[1], "rb");
	if (!file)
		die(argv[1]);
	size_t length = fread(file_buffer, 1, sizeof(file_buffer), file);
	fclose(file);
	const uint32_t *header = NULL;
	for (size_t offset = 0; offset + 32 <= length && offset < 8192; offset += 4) {
		const uint32_t *words = (const uint32_t *)(file_buffer + offset);
		if (words[0] == MB_MAGIC && words[0] + words[1] + words[2] == 0) {
			header = words;
			break;
		}
	}
	if (!header || !(header[1] & MB_AOUT_KLUDGE)) {
		fprintf(stderr, "startup: %s: no multiboot header with load addresses\n", argv[1]);
		return 1;
	}
	uint32_t header_addr = header[3], load_addr = header[4], bss_end = header[6], entry = header[7];
	size_t file_offset = (const uint8_t *)header - file_buffer - (header_addr - load_addr);
	size_t image = length - file_offset;
	if (header[5])
		image = header[5] - load_addr;
	if ((size_t)load_addr + image > memory_size || (bss_end && bss_end > memory_size)) {
		fprintf(stderr, "startup: kernel does not fit in guest memory\n");
		return 1;
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = checked_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	checked_ioctl(vm, KVM_SET_TSS_ADDR, (void *)0xfffbd000ul, "KVM_SET_TSS_ADDR");
	uint8_t *memory = mmap(NULL, memory_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (memory == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = memory_size, .userspace_addr = (uintptr_t)memory};
	checked_ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	memcpy(memory + load_addr, file_buffer + file_offset, image);
	if (bss_end > load_addr + image)
		memset(memory + load_addr + image, 0, bss_end - load_addr - image);
	uint32_t *info = (uint32_t *)(memory + MB_INFO_ADDRESS);
	info[0] = 1;                                   /* flags: mem_lower / mem_upper */
	info[1] = 640;
	info[2] = (uint32_t)(memory_size / 1024 - 1024);

	int vcpu = checked_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	struct {
		struct kvm_cpuid2 header;
		struct kvm_cpuid_entry2 entries[MAX_CPUID_ENTRIES];
	} cpuid = {.header.nent = MAX_CPUID_ENTRIES};
	checked_ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid, "KVM_GET_SUPPORTED_CPUID");
	checked_ioctl(vcpu, KVM_SET_CPUID2, &cpuid, "KVM_SET_CPUID2");
	int run_size = checked_ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	checked_ioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	flat_segment(&sregs.cs, 0x08, 11);
	flat_segment(&sregs.ds, 0x10, 3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 = 0x11;                              /* PE | ET */
	checked_ioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = entry, .rax = 0x2BADB002u, .rbx = MB_INFO_ADDRESS, .rflags = 2};
	checked_ioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
			uint32_t value = 0;
			memcpy(&value, (uint8_t *)run + run->io.data_offset, run->io.size);
			printf("port=%#x value=%u\n", run->io.port, value);
			return 0;
		}
		fprintf(stderr, "startup: unexpected exit reason %u\n", run->exit_reason);
		return 1;
	}
}
