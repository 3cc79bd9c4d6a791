#!/usr/bin/env python3
"""Writes favicon.ico beside this script: a 16x16 and a 32x32 icon (32-bit BMP images inside an
ICO container), drawn here so that nothing is downloaded. Run it again after changing it:
`python3 src/dashboard/make_favicon.py`."""
import os
import struct


def pixel(x, y, n):
    """RGBA of the icon at (x, y) on an n-by-n grid: a blue disc with a white handset bar."""
    c = (n - 1) / 2
    dx, dy = x - c, y - c
    r = n / 2 - 0.5
    if dx * dx + dy * dy > r * r:
        return (0, 0, 0, 0)
    # a white bar (the bridge) and two posts
    u = n / 16
    if abs(dy) <= 1.2 * u and abs(dx) <= 5 * u:
        return (255, 255, 255, 255)
    if abs(dx) >= 3.2 * u and abs(dx) <= 5 * u and dy >= -1.2 * u and dy <= 4 * u:
        return (255, 255, 255, 255)
    return (0x1f, 0x6f, 0xd1, 255)


def bmp(n):
    header = struct.pack("<IiiHHIIiiII", 40, n, 2 * n, 1, 32, 0, 0, 0, 0, 0, 0)
    rows = bytearray()
    for y in range(n - 1, -1, -1):  # bottom-up
        for x in range(n):
            r, g, b, a = pixel(x, y, n)
            rows += bytes((b, g, r, a))
    mask_row = ((n + 31) // 32) * 4
    mask = bytes(mask_row * n)  # the alpha channel decides; the AND mask stays clear
    return header + bytes(rows) + mask


def main():
    sizes = [16, 32]
    images = [bmp(n) for n in sizes]
    out = struct.pack("<HHH", 0, 1, len(images))
    offset = 6 + 16 * len(images)
    for n, img in zip(sizes, images):
        out += struct.pack("<BBBBHHII", n, n, 0, 0, 1, 32, len(img), offset)
        offset += len(img)
    for img in images:
        out += img
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "favicon.ico")
    with open(path, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
