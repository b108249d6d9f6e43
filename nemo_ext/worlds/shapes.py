"""2D drawing for the procedural worlds: named colours, backgrounds, anti-aliased shapes.

Shared by the worlds of the 2D tasks (general's bouncing shapes, action_control's pushing agent,
instruction's objects that move as told). Coordinates are pixels, +x right, +y down; pixel i
covers [i, i + 1). Object colours (saturated) and background colours (muted) are disjoint, so
objects stay visible and can be found again by colour.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "dark gray": (50, 50, 50),
    "brown": (105, 75, 50),
    "navy": (25, 30, 75),
    "olive": (85, 90, 40),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# image coordinates: +x is right, +y is down, so "up" is -y
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "up-right": (1, -1), "up": (0, -1), "up-left": (-1, -1),
    "left": (-1, 0), "down-left": (-1, 1), "down": (0, 1), "down-right": (1, 1),
}
SUPERSAMPLE = 4  # anti-aliasing: 4x4 coverage samples per pixel


def sample_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates (ys [H*S, 1], xs [1, W*S])."""
    ss = SUPERSAMPLE
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    return ys[:, None], xs[None, :]


def pixel_coverage(inside: np.ndarray) -> np.ndarray:
    """Supersampled boolean mask -> the fraction of each pixel covered (float [H, W])."""
    ss = SUPERSAMPLE
    h, w = inside.shape[0] // ss, inside.shape[1] // ss
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def coverage(shape: str, cx: float, cy: float, s: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered by the shape of half-size ``s`` centred at (cx, cy)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= s * s
    elif shape == "square":
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "triangle":  # apex up: (0,-s), base corners (-s,s) and (s,s)
        inside = (dy <= s) & (2 * dx - dy <= s) & (-2 * dx - dy <= s)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return pixel_coverage(inside)


def background(bg: dict[str, Any], height: int, width: int) -> np.ndarray:
    """A plain or two-tone (top half / bottom half) background, float [H, W, 3]."""
    img = np.empty((height, width, 3), dtype=np.float64)
    colors = [np.array(BACKGROUNDS[c], dtype=np.float64) for c in bg["colors"]]
    img[:] = colors[0]
    if bg["kind"] == "two-tone":
        img[height // 2:] = colors[1]
    return img


def sample_background(rng: np.random.Generator) -> dict[str, Any]:
    """A plain or two-tone (top/bottom) background, as stored in a sample's json."""
    bg_names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        return {"kind": "plain", "colors": [bg_names[int(rng.integers(len(bg_names)))]]}
    picked = rng.choice(bg_names, size=2, replace=False)
    return {"kind": "two-tone", "colors": [str(c) for c in picked]}


def draw(img: np.ndarray, alpha: np.ndarray, rgb: Sequence[int]) -> np.ndarray:
    """``img`` with colour ``rgb`` blended in at coverage ``alpha`` [H, W]."""
    a = alpha[..., None]
    return img * (1 - a) + np.asarray(rgb, dtype=np.float64) * a


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def join(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
