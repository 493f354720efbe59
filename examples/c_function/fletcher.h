/* Fletcher-16 checksum: the freestanding C function under test. */
#ifndef FLETCHER_H
#define FLETCHER_H

#include <stddef.h>
#include <stdint.h>

uint16_t fletcher16(const uint8_t *data, size_t length);

#endif
