/*
 * Test harness for fletcher16(), run as a user-mode (CPL 3) guest.
 *
 * Known answers are checked in the guest with GUEST_ASSERT_EQ. Then the host
 * drives the test: at each GUEST_SYNC(1) it writes an input into `input` and
 * replies with its length (0 ends the loop); GUEST_SYNC(2) hands back the
 * checksum for the host to compare with its own reference implementation.
 */
#include "minivmm_test.h"
#include "fletcher.h"

uint8_t input[8192];

void guest_main(void)
{
    GUEST_ASSERT_EQ(fletcher16((const uint8_t *)"abcde", 5), 0xc8f0);
    GUEST_ASSERT_EQ(fletcher16((const uint8_t *)"abcdef", 6), 0x2057);
    GUEST_ASSERT_EQ(fletcher16((const uint8_t *)"abcdefgh", 8), 0x0627);
    GUEST_ASSERT_EQ(fletcher16(input, 0), 0);

    for (unsigned long round = 0;; round++) {
        unsigned long length = GUEST_SYNC(1, round);
        if (length == 0)
            break;
        GUEST_ASSERT(length <= sizeof(input));
        uint16_t sum = fletcher16(input, length);
        GUEST_PRINTF("round %lu: %lu bytes -> %#06x\n", round, length, sum);
        GUEST_SYNC(2, sum);
    }
}
