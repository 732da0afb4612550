#!/usr/bin/env python3
"""Measures what the repository's frame size costs, for docs/repository-format.md.

    scripts/frame-size.py [WORKDIR]

Makes an ext4 image of /usr/share/doc (text, mke2fs -d, no mount needed), then for frame
sizes of 1, 2, 4 and 8 MiB reports: stored frames (not all-zero), their zstd -3 size, and
what a second push sends after 1% of the image's used blocks are rewritten at random
places (as a template rebuilt from a sandbox that changed scattered files would). It
drives the zstd CLI, one frame at a time, so the figures are those of the frames the
repository stores.
"""
import hashlib, os, random, subprocess, sys

work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/frame-size"
os.makedirs(work, exist_ok=True)
image = os.path.join(work, "docs.img")
if not os.path.exists(image):
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", "/usr/share/doc",
                    image, "256M"], check=True)
data = bytearray(open(image, "rb").read())
used = [i for i in range(len(data) // 4096) if any(data[i * 4096:(i + 1) * 4096])]
rng = random.Random(1)
changed = bytearray(data)
for block in rng.sample(used, len(used) // 100):
    changed[block * 4096:(block + 1) * 4096] = rng.randbytes(4096)

def frames(buf, size):
    for off in range(0, len(buf), size):
        piece = bytes(buf[off:off + size])
        if piece.count(0) != len(piece):
            yield hashlib.sha256(piece).hexdigest(), piece

print(f"image {len(data) >> 20} MiB, {len(used) * 4096 >> 20} MiB in non-zero 4 KiB blocks")
print("frame  frames  raw MiB  zstd MiB  ratio  2nd push frames  2nd push zstd MiB  2nd/1st")
for mib in (1, 2, 4, 8):
    size = mib << 20
    first = {}
    for name, piece in frames(data, size):
        if name not in first:
            first[name] = len(subprocess.run(["zstd", "-3", "-q", "-c"], input=piece, capture_output=True).stdout)
    raw = sum(1 for _ in frames(data, size)) * size
    sent, count = 0, 0
    for name, piece in frames(changed, size):
        if name not in first:
            first[name] = len(subprocess.run(["zstd", "-3", "-q", "-c"], input=piece, capture_output=True).stdout)
            sent += first[name]
            count += 1
    total = sum(v for k, v in first.items()) - sent
    print(f"{mib} MiB  {len(first) - count:6d}  {raw / 2**20:7.0f}  {total / 2**20:8.1f}  {raw / total:5.2f}"
          f"  {count:15d}  {sent / 2**20:17.1f}  {sent / total:7.2f}")
