"""A havoc-style mutator: stacked random edits over an input, with splicing from a corpus.

Operations (one to `max_stack` of them per mutated input, each picked at random):
bit flip, random byte, interesting 8/16/32-bit values (both byte orders),
add/subtract a small value, insert random or repeated bytes, clone a chunk,
delete a chunk, overwrite a chunk with another chunk, and splice with
another corpus entry; with a `dictionary` (e.g. the comparison constants
of the target's code) also overwrite with or insert a token.
Sizes stay within `max_size`.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Sequence

INTERESTING_8 = (-128, -1, 0, 1, 16, 32, 64, 100, 127)
INTERESTING_16 = INTERESTING_8 + (-32768, -129, 128, 255, 256, 512, 1000, 1024, 4096, 32767)
INTERESTING_32 = INTERESTING_16 + (-2147483648, -100663046, -32769, 32768, 65535, 65536,
                                   100663045, 2147483647)
ARITH_MAX = 35


@dataclass
class Mutator:
    """Mutates inputs; `rng` makes campaigns reproducible."""
    max_size: int = 4096
    rng: random.Random = field(default_factory=random.Random)
    max_stack: int = 8
    dictionary: list[bytes] = field(default_factory=list)

    def mutate(self, data: bytes, corpus: Sequence[bytes] = ()) -> bytes:
        """A mutated copy of `data` (never longer than `max_size`)."""
        rng = self.rng
        buf = bytearray(data)
        ops = 14 if self.dictionary else 12
        for _ in range(1 << rng.randrange(0, self.max_stack.bit_length())):
            op = rng.randrange(ops + 1 if corpus else ops)
            if op == ops:
                self._splice(buf, corpus)
            elif op >= 12:
                self._token(buf, insert=op == 13)
            elif not buf or op >= 9:
                self._grow(buf)
            elif op == 0:
                i = rng.randrange(len(buf) * 8)
                buf[i >> 3] ^= 1 << (i & 7)
            elif op == 1:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op == 2:
                buf[rng.randrange(len(buf))] = rng.choice(INTERESTING_8) & 0xFF
            elif op == 3:
                self._put(buf, 2, rng.choice(INTERESTING_16))
            elif op == 4:
                self._put(buf, 4, rng.choice(INTERESTING_32))
            elif op == 5:
                i = rng.randrange(len(buf))
                buf[i] = (buf[i] + rng.choice((1, -1)) * rng.randrange(1, ARITH_MAX + 1)) & 0xFF
            elif op == 6:
                self._delete(buf)
            elif op == 7:
                self._overwrite(buf)
            else:
                self._arith_wide(buf)
        if len(buf) > self.max_size:
            del buf[self.max_size:]
        return bytes(buf)

    # -- operations -------------------------------------------------------------------------
    def _put(self, buf: bytearray, width: int, value: int) -> None:
        if len(buf) < width:
            return
        i = self.rng.randrange(len(buf) - width + 1)
        fmt = {2: "h", 4: "i"}[width]
        order = self.rng.choice("<>")
        try:
            buf[i:i + width] = struct.pack(order + fmt, value)
        except struct.error:
            buf[i:i + width] = struct.pack(order + fmt.upper(), value & ((1 << (8 * width)) - 1))

    def _arith_wide(self, buf: bytearray) -> None:
        if len(buf) < 2:
            return
        width = 2 if len(buf) < 4 or self.rng.random() < 0.5 else 4
        i = self.rng.randrange(len(buf) - width + 1)
        order = self.rng.choice(("little", "big"))
        value = int.from_bytes(buf[i:i + width], order)
        value = (value + self.rng.choice((1, -1)) * self.rng.randrange(1, ARITH_MAX + 1)) % (1 << (8 * width))
        buf[i:i + width] = value.to_bytes(width, order)

    def _chunk(self, limit: int) -> int:
        """A chunk length, usually small."""
        rng = self.rng
        limit = max(1, limit)
        if rng.random() < 0.8:
            return rng.randint(1, min(limit, 32))
        return rng.randint(1, limit)

    def _grow(self, buf: bytearray) -> None:
        room = self.max_size - len(buf)
        if room <= 0:
            return
        rng = self.rng
        n = self._chunk(room)
        at = rng.randint(0, len(buf))
        if buf and rng.random() < 0.5:
            src = rng.randrange(len(buf))
            chunk = buf[src: src + n]                           # clone
        elif rng.random() < 0.5:
            chunk = bytes([rng.randrange(256)]) * n             # repeated byte
        else:
            chunk = rng.randbytes(n)                            # random bytes
        buf[at:at] = chunk

    def _delete(self, buf: bytearray) -> None:
        if len(buf) < 2:
            return
        n = self._chunk(len(buf) - 1)
        at = self.rng.randrange(len(buf) - n + 1)
        del buf[at: at + n]

    def _overwrite(self, buf: bytearray) -> None:
        if len(buf) < 2:
            return
        n = self._chunk(len(buf) - 1)
        src = self.rng.randrange(len(buf) - n + 1)
        dst = self.rng.randrange(len(buf) - n + 1)
        buf[dst: dst + n] = buf[src: src + n]

    def _token(self, buf: bytearray, insert: bool) -> None:
        token = self.dictionary[self.rng.randrange(len(self.dictionary))]
        if insert or len(buf) < len(token):
            if len(buf) + len(token) <= self.max_size:
                at = self.rng.randint(0, len(buf))
                buf[at:at] = token
            return
        at = self.rng.randrange(len(buf) - len(token) + 1)
        buf[at: at + len(token)] = token

    def _splice(self, buf: bytearray, corpus: Sequence[bytes]) -> None:
        other = corpus[self.rng.randrange(len(corpus))]
        if not other:
            return
        if not buf:
            buf[:] = other
            return
        cut_self = self.rng.randint(0, len(buf))
        cut_other = self.rng.randrange(len(other))
        buf[cut_self:] = other[cut_other:]


__all__ = ["Mutator", "INTERESTING_8", "INTERESTING_16", "INTERESTING_32"]
