"""A real file system that refuses file locks, as NFS mounted with `nolock` and some Lustre mounts do: a FUSE server
over /dev/fuse in plain Python (no libfuse), its files in memory, mounted by the kernel like any other.

    python tests/lockless_fs.py MOUNTPOINT MODE      (root; prints "mounted" once the mount is up)

MODE says what a lock request (flock, or an fcntl/lockf lock) gets: "refuse", the error ENOLCK ("No locks
available", NFS's answer without its lock manager); "hang", no answer at all (a lock manager that does not answer);
"local", no request: the kernel locks the file itself, as on a local disk. The server runs until it is killed, which
ends every request still waiting; the mount point is then unmounted with `umount -l`.

It answers the few requests that making, writing, reading, listing and removing files and directories take, and
ENOSYS to any other (which the kernel takes as "not supported").
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
import time
from dataclasses import dataclass, field

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
MKDIR, UNLINK, RMDIR, RENAME, OPEN, READ, WRITE, STATFS, RELEASE = 9, 10, 11, 12, 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 20, 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 31, 32, 33, 34, 35, 36, 38, 42
LOCK_REQUESTS = (GETLK, SETLK, SETLKW)
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)

FUSE_POSIX_LOCKS, FUSE_FLOCK_LOCKS = 1 << 1, 1 << 10  # the server handles fcntl locks, and flock
FATTR_MODE, FATTR_SIZE = 1 << 0, 1 << 3
MAX_WRITE = 128 << 10
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime (3 nsec) mode nlink uid gid rdev ...


@dataclass
class Node:
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    mtime: int = field(default_factory=lambda: int(time.time()))


class LocklessFS:
    def __init__(self, device: int, mode: str):
        self.device, self.mode = device, mode
        self.nodes = {1: Node(stat.S_IFDIR | 0o755)}
        self.next_id = 2

    def serve(self) -> None:
        while True:
            try:
                request = os.read(self.device, MAX_WRITE + 4096)
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted
                    return
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: a request taken back
                    continue
                raise
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size:]
            if opcode in NO_REPLY or (opcode in LOCK_REQUESTS and self.mode == "hang"):
                continue
            try:
                reply = self.handle(opcode, nodeid, body)
                error = 0
            except OSError as e:
                reply, error = b"", e.errno
            try:
                os.write(self.device, OUT_HEADER.pack(OUT_HEADER.size + len(reply), -error, unique) + reply)
            except FileNotFoundError:  # the request was interrupted meanwhile
                pass
            if opcode == DESTROY:
                return

    def handle(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        node = self.nodes.get(nodeid)
        if node is None and opcode != INIT:
            raise OSError(errno.ENOENT, "no such node")
        if opcode == INIT:
            major, minor, readahead, flags = struct.unpack_from("<IIII", body)
            wanted = FUSE_POSIX_LOCKS | FUSE_FLOCK_LOCKS if self.mode in ("refuse", "hang") else 0
            # fuse_init_out of protocol 7.31: 64 bytes
            return struct.pack("<IIIIHHIIHHII", 7, 31, readahead, flags & wanted, 16, 12, MAX_WRITE, 1, 32, 0, 0,
                               0) + bytes(24)
        if opcode in LOCK_REQUESTS:
            raise OSError(errno.ENOLCK, "no locks available")
        if opcode == LOOKUP:
            return self.entry(self.child(node, name(body)))
        if opcode == GETATTR:
            return self.attr_out(nodeid)
        if opcode == SETATTR:
            valid, _, _, size = struct.unpack_from("<IIQQ", body)
            mode = struct.unpack_from("<I", body, 68)[0]
            if valid & FATTR_SIZE:
                del node.data[size:]
                node.data.extend(bytes(size - len(node.data)))
            if valid & FATTR_MODE:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            return self.attr_out(nodeid)
        if opcode == MKDIR:
            mode, umask = struct.unpack_from("<II", body)
            return self.entry(self.make(node, name(body[8:]), stat.S_IFDIR | (mode & ~umask & 0o7777)))
        if opcode == CREATE:
            flags, mode, umask, _ = struct.unpack_from("<IIII", body)
            filename = name(body[16:])
            if filename in node.children:
                if flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, "exists")
                created = node.children[filename]
            else:
                created = self.make(node, filename, stat.S_IFREG | (mode & ~umask & 0o7777))
            return self.entry(created) + struct.pack("<QII", 0, 0, 0)
        if opcode in (OPEN, OPENDIR):
            return struct.pack("<QII", 0, 0, 0)
        if opcode == READ:
            _, offset, size = struct.unpack_from("<QQI", body)
            return bytes(node.data[offset:offset + size])
        if opcode == WRITE:
            _, offset, size = struct.unpack_from("<QQI", body)
            data = body[40:40 + size]
            node.data.extend(bytes(max(0, offset - len(node.data))))
            node.data[offset:offset + len(data)] = data
            node.mtime = int(time.time())
            return struct.pack("<II", len(data), 0)
        if opcode in (UNLINK, RMDIR):
            filename = name(body)
            target = self.nodes[self.child(node, filename)]
            if opcode == RMDIR and target.children:
                raise OSError(errno.ENOTEMPTY, "not empty")
            del node.children[filename]
            return b""
        if opcode == RENAME:
            (new_parent,) = struct.unpack_from("<Q", body)
            old, new = body[8:].split(b"\0")[:2]
            moved = self.child(node, old)
            del node.children[old]
            self.nodes[new_parent].children[new] = moved
            return b""
        if opcode == READDIR:
            _, offset, size = struct.unpack_from("<QQI", body)
            out = b""
            entries = [(b".", nodeid), (b"..", nodeid), *node.children.items()]
            for index, (entry, child) in enumerate(entries[offset:], start=offset + 1):
                kind = 4 if stat.S_ISDIR(self.nodes[child].mode) else 8  # DT_DIR, DT_REG
                dirent = struct.pack("<QQII", child, index, len(entry), kind) + entry
                dirent += bytes(-len(dirent) % 8)
                if len(out) + len(dirent) > size:
                    break
                out += dirent
            return out
        if opcode == STATFS:
            return struct.pack("<QQQQQIIII", 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 4096, 255, 4096, 0) + \
                bytes(24)
        if opcode in (RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR, ACCESS, DESTROY):
            return b""
        raise OSError(errno.ENOSYS, "not supported")

    def child(self, node: Node, filename: bytes) -> int:
        if filename not in node.children:
            raise OSError(errno.ENOENT, "no such file")
        return node.children[filename]

    def make(self, parent: Node, filename: bytes, mode: int) -> int:
        if filename in parent.children:
            raise OSError(errno.EEXIST, "exists")
        nodeid, self.next_id = self.next_id, self.next_id + 1
        self.nodes[nodeid] = Node(mode)
        parent.children[filename] = nodeid
        return nodeid

    def attr(self, nodeid: int) -> bytes:
        node = self.nodes[nodeid]
        links = 2 if stat.S_ISDIR(node.mode) else 1
        return ATTR.pack(nodeid, len(node.data), (len(node.data) + 511) // 512, node.mtime, node.mtime, node.mtime,
                         0, 0, 0, node.mode, links, 0, 0, 0, 4096, 0)

    def attr_out(self, nodeid: int) -> bytes:
        return struct.pack("<QII", 0, 0, 0) + self.attr(nodeid)  # valid for 0 s: the kernel always asks

    def entry(self, nodeid: int) -> bytes:
        return struct.pack("<QQQQII", nodeid, 0, 0, 0, 0, 0) + self.attr(nodeid)


def name(body: bytes) -> bytes:
    return body.split(b"\0", 1)[0]


def main(mountpoint: str, mode: str) -> None:
    assert mode in ("refuse", "hang", "local"), mode
    device = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={device},rootmode=40000,user_id=0,group_id=0"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"lockless", os.fsencode(mountpoint), b"fuse.lockless", 0, options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), mountpoint)
    print("mounted", flush=True)
    LocklessFS(device, mode).serve()


if __name__ == "__main__":
    main(*sys.argv[1:])
