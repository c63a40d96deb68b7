#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets, so the fuzzer starts from inputs that reach the
devices' request paths. virtio_mmio_driver: a well-behaved driver that initializes a block
(file-backed or layered) or vsock device, sets up its queues and submits one request. vsock_packets: well-formed packet
sequences (a connection's whole life, credit traffic). net_frames: RX and TX chains.
virtiofs_requests: FUSE request sequences (lookup and read, create and write, `..` and a
symlink out, readdir). Run from this directory."""
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


def block_seed(device, sector=0, length=512, status=0x1400):
    """device: 0 a read-write drive, 2 a read-only one, 4 a layered one."""
    mem = bytearray(IMAGE)
    # A read of `length` bytes at `sector`: header, data buffer, status byte.
    mem[0:48] = desc(0x1000, 16, 1, 1) + desc(0x1100, length, 3, 2) + desc(status, 1, 2, 0)
    mem[0x400:0x406] = struct.pack("<HHH", 0, 1, 0)
    mem[0x1000:0x1010] = struct.pack("<IIQ", 0, 0, sector)
    ops = init(1) + setup_queue(0, 8, 0, 0x400, 0x800) + op_write(0x070, 15) + op_write(0x050, 0)
    return bytes([device]) + bytes(mem) + ops


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
# The layered read starts in the hole before the first layer (at 1 MiB) and ends inside it.
for name, data in [("block-read", block_seed(0)), ("block-ro-read", block_seed(2)),
                   ("block-layered-read", block_seed(4, (1 << 20) // 512 - 1, 1024, 0x1600)),
                   ("vsock-request", vsock_seed())]:
    with open(os.path.join("virtio_mmio_driver", name), "wb") as f:
        f.write(data)


def pkt(op, src_port=1234, dst_port=1024, payload=b"", buf_alloc=65536, fwd_cnt=0, dst_cid=2):
    """A guest-to-host vsock packet: 44-byte header (type 1 = stream), then the payload."""
    return struct.pack("<QQIIIHHIII", 3, dst_cid, src_port, dst_port, len(payload), 1, op, 0,
                       buf_alloc, fwd_cnt) + payload


REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
os.makedirs("vsock_packets", exist_ok=True)
for name, data in [
    ("connection-life", pkt(REQUEST) + pkt(RW, payload=b"hello") + pkt(CREDIT_REQUEST)
     + pkt(CREDIT_UPDATE, fwd_cnt=5) + pkt(SHUTDOWN) + pkt(RST)),
    ("reply-to-host", pkt(RESPONSE, src_port=1024, dst_port=1 << 30) + pkt(RW, 1024, 1 << 30, b"x" * 300)),
    ("wrong-cid", pkt(REQUEST, dst_cid=7) + pkt(RW, payload=b"y", dst_cid=7)),
]:
    with open(os.path.join("vsock_packets", name), "wb") as f:
        f.write(data)


def net_seed(features, frame_len):
    """virtio-net: RX ring (0x0) with four 2 KiB write-only buffers, TX ring (0x1000) with one
    frame (a 12-byte header, then an Ethernet frame) over two descriptors; the network sends a
    frame, the device takes it and the TX frame, and the network drains what it got."""
    mem = bytearray(IMAGE)
    for i in range(4):
        mem[16 * i:16 * i + 16] = desc(0x2000 + 0x100 * i, 2048 if features & 0x80 == 0 else 256, 2, 0)
    mem[0x400:0x40c] = struct.pack("<HHHHHH", 0, 4, 0, 1, 2, 3)
    mem[0x1000:0x1020] = desc(0x1c00, 12, 1, 1) + desc(0x1c0c, frame_len, 0, 0)
    mem[0x1400:0x1406] = struct.pack("<HHH", 0, 1, 0)
    eth = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x88, 0xb5]) + bytes(i % 256 for i in range(frame_len - 14))
    mem[0x1c0c:0x1c0c + frame_len] = eth

    def op(kind, a=0, b=0, value=0):
        return struct.pack("<BBBBI", kind, a, b, 0, value)

    ops = op(0, 1) + op(1, 100, 0, 0) + op(2) + op(0, 0) + op(4) + op(1, 0xdc, 0x05, 0x01000000) + op(2)
    return bytes([features]) + bytes(mem) + ops


os.makedirs("net_frames", exist_ok=True)
for name, data in [("plain", net_seed(0, 100)), ("offloads-mrg", net_seed(0xff, 1000))]:
    with open(os.path.join("net_frames", name), "wb") as f:
        f.write(data)


def fuse(opcode, nodeid, body, unique=2, split=0):
    """One FUSE request: the 40-byte header (len, opcode, unique, nodeid, uid, gid, pid,
    total_extlen, padding: its last byte is where the target splits the chain), then body."""
    return struct.pack("<IIQQIIIHBB", 40 + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0, split) + body


LOOKUP, GETATTR, OPEN, READ, WRITE, RELEASE, CREATE, MKDIR, SYMLINK, READDIR, OPENDIR = 1, 3, 14, 15, 16, 18, 35, 9, 6, 28, 27
os.makedirs("virtiofs_requests", exist_ok=True)
for name, data in [
    ("lookup-read", fuse(LOOKUP, 1, b"file\0") + fuse(OPEN, 2, struct.pack("<II", 0, 0))
     + fuse(READ, 2, struct.pack("<QQIIIII", 0, 0, 4096, 0, 0, 0, 0))),
    ("create-write", fuse(CREATE, 1, struct.pack("<IIII", 0o102, 0o644, 0o22, 0) + b"new\0")
     + fuse(WRITE, 3, struct.pack("<QQIIIII", 0, 0, 5, 0, 0, 0, 0) + b"hello", split=50)),
    ("dotdot-symlink", fuse(LOOKUP, 1, b"..\0") + fuse(SYMLINK, 1, b"link\0/etc\0")
     + fuse(LOOKUP, 1, b"link\0") + fuse(MKDIR, 1, struct.pack("<II", 0o755, 0o22) + b"d\0")),
    ("readdir", fuse(OPENDIR, 1, struct.pack("<II", 0, 0))
     + fuse(READDIR, 1, struct.pack("<QQIIIII", 0, 0, 4096, 0, 0, 0, 0)) + fuse(GETATTR, 1, struct.pack("<IIQ", 0, 0, 0))),
]:
    with open(os.path.join("virtiofs_requests", name), "wb") as f:
        f.write(data)
