/* Fletcher-16 (RFC 1146 style, modulo 255), written for a freestanding build. */
#include "fletcher.h"

uint16_t fletcher16(const uint8_t *data, size_t length)
{
    uint32_t sum1 = 0, sum2 = 0;
    while (length) {
        /* 5802 bytes at most before the 32-bit sums could overflow */
        size_t block = length > 5802 ? 5802 : length;
        length -= block;
        while (block--) {
            sum1 += *data++;
            sum2 += sum1;
        }
        sum1 %= 255;
        sum2 %= 255;
    }
    return (uint16_t)(sum2 << 8 | sum1);
}
