"""Draw the loss curve of a `mamba-train` log as a PNG, with numpy and zlib only.

    python benchmarks/train_log/plot_loss.py benchmarks/train_log/train_log.jsonl \
        benchmarks/train_log/loss.png

The log is JSON lines; records with "loss" (nats per token, training batch) and
records with "eval_bpb" (held-out bits per byte) are drawn, both as bits per byte on a
logarithmic axis, against the step. Text uses a 3x5 pixel font drawn here, so no plotting library
is needed.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import zlib

import numpy as np

_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "/": "001001010100100", "(": "010100100100010", ")": "010001001001010",
    ",": "000000000010100", " ": "000000000000000", "A": "010101111101101",
    "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "R": "110101110101101", "S": "011100010001110",
    "T": "111010010010010", "U": "101101101101111", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010",
}


def _text(img: np.ndarray, x: int, y: int, s: str, color, scale: int = 2) -> None:
    """Draw `s` with its top-left corner at (x, y)."""
    for ch in s.upper():
        glyph = _FONT.get(ch, _FONT[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                y0, x0 = y + r * scale, x + c * scale
                img[y0 : y0 + scale, x0 : x0 + scale] = color
        x += 4 * scale


def _text_width(s: str, scale: int = 2) -> int:
    return 4 * scale * len(s) - scale


def _line(img: np.ndarray, p0, p1, color, width: int = 2) -> None:
    (x0, y0), (x1, y1) = p0, p1
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            xx = np.clip(xs + dx - width // 2, 0, w - 1)
            yy = np.clip(ys + dy - width // 2, 0, h - 1)
            img[yy, xx] = color


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v / 1000:g}K"
    return f"{v:g}"


def write_png(path: str | pathlib.Path, img: np.ndarray) -> None:
    """Write an (h, w, 3) uint8 RGB image as a PNG file."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    pathlib.Path(path).write_bytes(png)


def plot(records: list[dict], title: str, width: int = 900, height: int = 540) -> np.ndarray:
    train = [(r["step"], r["loss"] / math.log(2)) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_bpb"]) for r in records if "eval_bpb" in r]
    if not train and not evals:
        raise ValueError("plot: the log has no 'loss' or 'eval_bpb' records")
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 80, 30, 50, 60
    pts = train + evals
    x_hi = max(s for s, _ in pts) or 1
    ys = [v for _, v in pts]
    # A logarithmic y axis: the first steps fall from ~8 bits, the rest differ by tenths.
    y_lo, y_hi = math.log2(min(ys)) - 0.05, math.log2(max(ys)) + 0.05

    def to_px(s: float, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * s / x_hi
        y = top + (height - top - bottom) * (1 - (math.log2(v) - y_lo) / (y_hi - y_lo))
        return x, y

    grey, black = (225, 225, 225), (0, 0, 0)
    y_ticks = [m * 2.0**e for e in range(-4, 8) for m in (1, 1.25, 1.5, 1.75)]
    y_ticks = [v for v in y_ticks if y_lo <= math.log2(v) <= y_hi]
    if len(y_ticks) > 12:
        y_ticks = [v for v in y_ticks if math.log2(v).is_integer() or v in (0.75, 1.5, 3, 6)]
    for v in y_ticks:
        _, y = to_px(0, v)
        _line(img, (left, y), (width - right, y), grey, 1)
        label = _fmt(v)
        _text(img, left - 8 - _text_width(label), int(y) - 5, label, black)
    for s in _nice_ticks(0, x_hi):
        x, _ = to_px(s, 2.0**y_lo)
        _line(img, (x, top), (x, height - bottom), grey, 1)
        label = _fmt(s)
        _text(img, int(x) - _text_width(label) // 2, height - bottom + 8, label, black)
    _line(img, (left, top), (left, height - bottom), black, 1)
    _line(img, (left, height - bottom), (width - right, height - bottom), black, 1)

    blue, red = (40, 90, 200), (210, 40, 40)
    for a, b in zip(train, train[1:], strict=False):
        _line(img, to_px(*a), to_px(*b), blue, 2)
    for a, b in zip(evals, evals[1:], strict=False):
        _line(img, to_px(*a), to_px(*b), red, 2)
    for p in evals:
        x, y = to_px(*p)
        img[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4] = red

    _text(img, width // 2 - _text_width(title) // 2, 16, title, black)
    _text(img, width // 2 - _text_width("STEP") // 2, height - 24, "STEP", black)
    _text(img, 8, top - 24, "BITS/BYTE (LOG SCALE)", black)
    legend_x = width - right - 260
    _line(img, (legend_x, 80), (legend_x + 24, 80), blue, 2)
    _text(img, legend_x + 32, 75, "TRAIN BATCH", black)
    _line(img, (legend_x, 100), (legend_x + 24, 100), red, 2)
    _text(img, legend_x + 32, 95, "HELD-OUT", black)
    return img


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: plot_loss.py LOG.jsonl OUT.png")
    log, out = map(pathlib.Path, argv)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    title = "MAMBA BYTE LM ON THE PYTHON STDLIB"
    write_png(out, plot(records, title))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
