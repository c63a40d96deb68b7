#!/usr/bin/env python3
"""Writes seed inputs for the virtio_mmio_driver fuzz target: a well-behaved driver that
initializes a block (or vsock) device, sets up its queues and submits one request, so the
fuzzer starts from inputs that reach the devices' request paths. Run from this directory."""
import os
import struct

IMAGE = 8 << 10


def op_write(offset, value):
    return struct.pack("<BHBI", 0, offset, 0, value)


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def setup_queue(sel, size, desc_addr, avail, used):
    return b"".join([
        op_write(0x030, sel), op_write(0x038, size),
        op_write(0x080, desc_addr), op_write(0x084, 0),
        op_write(0x090, avail), op_write(0x094, 0),
        op_write(0x0a0, used), op_write(0x0a4, 0),
        op_write(0x044, 1),
    ])


def init(features_hi):
    return b"".join([
        op_write(0x070, 1), op_write(0x070, 3),
        op_write(0x024, 1), op_write(0x020, features_hi),
        op_write(0x070, 11),
    ])


def block_seed(read_only):
    mem = bytearray(IMAGE)
    # A read of sector 0: header, 512-byte data buffer, status byte.
    mem[0:48] = desc(0x1000, 16, 1, 1) + desc(0x1100, 512, 3, 2) + desc(0x1400, 1, 2, 0)
    mem[0x400:0x406] = struct.pack("<HHH", 0, 1, 0)
    mem[0x1000:0x1010] = struct.pack("<IIQ", 0, 0, 0)
    ops = init(1) + setup_queue(0, 8, 0, 0x400, 0x800) + op_write(0x070, 15) + op_write(0x050, 0)
    return bytes([2 if read_only else 0]) + bytes(mem) + ops


def vsock_seed():
    mem = bytearray(IMAGE)
    # RX queue 0: two empty write-only buffers; TX queue 1: one REQUEST packet to port 1024.
    mem[0:32] = desc(0x1000, 256, 2, 0) + desc(0x1100, 256, 2, 0)
    mem[0x400:0x408] = struct.pack("<HHHH", 0, 2, 0, 1)
    mem[0x1800:0x1810] = desc(0x1200, 44, 0, 0)
    mem[0x1c00:0x1c06] = struct.pack("<HHH", 0, 1, 0)
    mem[0x1200:0x1200 + 44] = struct.pack("<QQIIIHHIII", 3, 2, 1234, 1024, 0, 1, 1, 0, 65536, 0)
    ops = (init(1) + setup_queue(0, 8, 0, 0x400, 0x800) + setup_queue(1, 8, 0x1800, 0x1c00, 0x1e00)
           + setup_queue(2, 8, 0x1900, 0x1d00, 0x1f00) + op_write(0x070, 15)
           + op_write(0x050, 1) + op_write(0x050, 0))
    return bytes([1]) + bytes(mem) + ops


os.makedirs("virtio_mmio_driver", exist_ok=True)
for name, data in [("block-read", block_seed(False)), ("block-ro-read", block_seed(True)),
                   ("vsock-request", vsock_seed())]:
    with open(os.path.join("virtio_mmio_driver", name), "wb") as f:
        f.write(data)
