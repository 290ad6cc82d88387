"""PNG files written chunk by chunk, for the cases Pillow cannot write (16-bit RGB, lying headers)."""

from __future__ import annotations

import struct
import zlib


def png_file(width: int, height: int, *, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A non-interlaced PNG of ``rows`` (each row already prefixed by its filter byte), compressed as one IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
