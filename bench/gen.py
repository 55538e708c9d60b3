#!/usr/bin/env python3
"""Generates benchmark endpoint trees with a fixed seed.

gen.py base DIR [SCALE [FILES [LARGE]]]
                               an OS-like base tree: FILES files at SCALE 1 (default
                               45000), LARGE per mille of them 1-8 MiB (default 3)
gen.py user DIR N [SCALE]      user files unique to endpoint N, added into DIR
gen.py change DIR [PERCENT]    changes PERCENT % (default 1) of the files in DIR: appended,
                               edited in the middle, added, deleted
"""
import os
import random
import sys

WORDS = ("lib usr share doc locale config service daemon kernel module firmware "
         "python perl gnome font icon theme x86_64 linux debian package version "
         "license copyright changelog readme manual page system user group").split()


_TEXT = None


def text_pool():
    global _TEXT
    if _TEXT is None:
        rng = random.Random(42)
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200000))
        _TEXT = ("\n".join(lines)).encode()
    return _TEXT


def content(rng, size):
    # Half text-like (compressible, like configs and docs), half binary (like libraries
    # and media). Text is a random slice of a fixed pool, so it dedups only by accident.
    if rng.random() < 0.5:
        pool = text_pool()
        out = bytearray()
        while len(out) < size:
            start = rng.randrange(len(pool) - 4096)
            out += pool[start:start + min(size - len(out), rng.randint(512, 4096))]
        return bytes(out)
    return rng.randbytes(size)


def size_of(rng, large=3):
    r = rng.random()
    if r < 0.65:
        return rng.randint(0, 4096)
    if r < 0.95:
        return rng.randint(4096, 65536)
    if r < 1 - large / 1000:
        return rng.randint(65536, 256 << 10)
    return rng.randint(1 << 20, 8 << 20)


def base(root, scale, files=45000, large=3):
    rng = random.Random(20261125)
    files = int(files * scale)
    dirs = [root]
    os.makedirs(root, exist_ok=True)
    for i in range(files):
        if i % 12 == 0:
            parent = rng.choice(dirs[-200:] if rng.random() < 0.7 else dirs)
            d = os.path.join(parent, "d%05d" % i)
            os.makedirs(d, exist_ok=True)
            dirs.append(d)
        d = rng.choice(dirs[-20:])
        with open(os.path.join(d, "f%06d" % i), "wb") as f:
            f.write(content(rng, size_of(rng, large)))
        if i % 500 == 0:
            os.symlink("f%06d" % i, os.path.join(d, "l%06d" % i))


def user(root, n, scale):
    rng = random.Random(1000 + n)
    home = os.path.join(root, "home", "user%d" % n)
    for i in range(int(500 * scale)):
        d = os.path.join(home, "docs%02d" % (i % 25))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "u%05d" % i), "wb") as f:
            f.write(content(rng, size_of(rng)))


def change(root, percent):
    rng = random.Random(777)
    paths = []
    for d, _, fs in os.walk(root):
        paths.extend(os.path.join(d, f) for f in fs if not os.path.islink(os.path.join(d, f)))
    paths.sort()
    picked = rng.sample(paths, max(4, int(len(paths) * percent / 100)))
    for i, p in enumerate(picked):
        kind = i % 4
        if kind == 0:
            with open(p, "ab") as f:
                f.write(content(rng, rng.randint(100, 20000)))
        elif kind == 1:
            size = os.path.getsize(p)
            with open(p, "r+b") as f:
                f.seek(size // 2)
                f.write(rng.randbytes(min(64, max(1, size // 2))))
        elif kind == 2:
            with open(p + ".new", "wb") as f:
                f.write(content(rng, size_of(rng)))
        else:
            os.unlink(p)


if __name__ == "__main__":
    cmd, target = sys.argv[1], sys.argv[2]
    if cmd == "base":
        base(target, float(sys.argv[3]) if len(sys.argv) > 3 else 1.0,
             int(sys.argv[4]) if len(sys.argv) > 4 else 45000,
             float(sys.argv[5]) if len(sys.argv) > 5 else 3)
    elif cmd == "user":
        user(target, int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 1.0)
    elif cmd == "change":
        change(target, float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
    else:
        sys.exit(__doc__)
