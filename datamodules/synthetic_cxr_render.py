"""Pixels of the synthetic chest X-rays (:mod:`datamodules.synthetic`, whose docstring describes what an image
holds): per-patient anatomy, background texture, lesions and the distracting marker letter. Pure functions of the
config, the plan row and the image index."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datamodules.synthetic import SyntheticCXRConfig

__all__ = ["render_patient", "render_image"]


def _patient_anatomy(rng: np.random.Generator) -> dict[str, float]:
    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    return {
        "body_ax": u(0.40, 0.45), "lung_off": u(0.155, 0.185), "lung_cy": u(0.43, 0.47),
        "lung_a": u(0.11, 0.13), "lung_b": u(0.25, 0.29), "heart_dx": u(0.05, 0.08),
        "heart_cy": u(0.62, 0.66), "heart_a": u(0.12, 0.145), "heart_b": u(0.095, 0.115),
        "rib_spacing": u(0.062, 0.075), "rib_phase": u(0.0, 0.07), "tissue": u(0.44, 0.52),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- render
def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over ``width`` (cheaper than a sigmoid)."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _smoothing_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian interpolation weights: ``W @ G @ W.T`` turns a (cells, cells) random grid
    into smooth noise of unit-ish variance at any resolution (two small matmuls instead of a filter)."""
    x = (np.arange(size) + 0.5) / size
    c = (np.arange(cells) + 0.5) / cells
    w = np.exp(-0.5 * ((x[:, None] - c[None, :]) * cells / 0.8) ** 2)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
    return w.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    w = _smoothing_matrix(size, cells)
    return w @ rng.standard_normal((cells, cells), dtype=np.float32) @ w.T


_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _marker_box(size: int, corner: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the marker letter in pixels: 7 % of the width high, inset 4 % from the corner."""
    h = max(7, round(0.07 * size))
    w = max(5, round(h * 5 / 7))
    inset = max(1, round(0.04 * size))
    x = inset if corner in (0, 2) else size - inset - w
    y = inset if corner in (0, 1) else size - inset - h
    return x, y, w, h


def _glyph(letter: str, w: int, h: int) -> np.ndarray:
    bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]])
    return bitmap[np.arange(h) * 7 // h][:, np.arange(w) * 5 // w]  # nearest-neighbour upscale: blocky


def _candidates(dist: np.ndarray, margin: float, occupied: list[tuple[int, int, int, int]], pad: int):
    """Pixels at least ``margin`` inside the lung, away from earlier lesions' boxes (grown by ``pad``)."""
    ok = dist > margin
    free = ok.copy()
    for x0, y0, x1, y1 in occupied:
        free[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = False
    for choice in (free, ok):
        idx = np.flatnonzero(choice)
        if len(idx):
            return idx
    return np.array([int(np.argmax(dist))])  # tiny images: the deepest lung pixel


def render_patient(config: SyntheticCXRConfig, patient_id: int) -> dict:
    """A patient's anatomy, drawn once on a canvas 6 % larger than the image; each follow-up image is a
    shifted crop of it (positioning), so all images of a patient share lungs, heart, ribs and texture.

    Returns ``x`` (1, P) and ``y`` (P, 1) canvas coordinates (fractions of the image width), ``image``
    (float (P, P), before lesions, noise and intensity jitter), ``side_dist`` (approximate signed distance to
    the boundary of each lung, positive inside; image-left lung first), ``lung_d`` (their maximum), the
    lung centres ``centres`` and half-height ``lung_b``.
    """
    s = config.image_size
    pad = max(1, round(0.03 * s))
    rng = np.random.default_rng([config.seed, 1, patient_id])
    a = _patient_anatomy(rng)
    grid = (np.arange(-pad, s + pad, dtype=np.float32) + 0.5) / s
    x, y = grid[None, :], grid[:, None]
    lung_b = a["lung_b"]

    ax = x - 0.5
    body = _ramp(1.0 - (np.abs(ax) / a["body_ax"]) ** 3 - ((y - 0.66) / 0.62) ** 2, 0.08)
    hx, hy = (x - 0.5 - a["heart_dx"]) / a["heart_a"], (y - a["heart_cy"]) / a["heart_b"]
    heart_d = (1.0 - np.sqrt(hx**2 + hy**2)) * a["heart_b"]

    side_dist, centres = [], []
    for side in (-1, 1):  # image left (patient right) and image right (patient left)
        cx = 0.5 + side * a["lung_off"]
        cy = a["lung_cy"] + (0.01 if side < 0 else 0.0)
        taper = 0.62 + 0.38 * np.clip((y - cy + lung_b) / (1.1 * lung_b), 0.0, 1.0)  # narrow apex
        la = a["lung_a"] * taper
        ell = (1.0 - np.sqrt(((x - cx) / la) ** 2 + ((y - cy) / lung_b) ** 2)) * np.minimum(la, lung_b)
        dome = cy + lung_b * (0.70 - (0.03 if side < 0 else 0.0) + 0.4 * ((x - cx) / a["lung_a"]) ** 2)
        side_dist.append(np.minimum(np.minimum(ell, dome - y), -heart_d))
        centres.append((side, cx, cy))
    lung_d = np.maximum(*side_dist)
    lung_soft = _ramp(lung_d, 0.02)

    img = 0.05 + (a["tissue"] + 0.08 * y) * body
    img = img - 0.30 * lung_soft
    img = img + 0.10 * _ramp(heart_d, 0.03) * body
    spine = _ramp(0.045 - np.abs(ax), 0.015) * _ramp(y - 0.06, 0.02)
    img = img + spine * (0.10 + 0.02 * np.cos(2 * np.pi * y / 0.05))
    med = _ramp(0.075 - np.abs(ax - 0.01), 0.03) * _ramp(y - 0.14, 0.05) * (1.0 - lung_soft)
    img = img + 0.07 * med
    # Rib arcs: periodic bright bands along curves that leave the spine, rise, then fall laterally.
    u = y - 0.35 * np.abs(ax) + 0.9 * ax**2 - a["rib_phase"]
    rib = (0.5 - 0.5 * np.cos(2 * np.pi * u / a["rib_spacing"])) ** 6
    rib = rib * _ramp(np.abs(ax) - 0.05, 0.02) * _ramp(y - 0.09, 0.03) * _ramp(0.8 - y, 0.05) * body
    img = img + rib * (0.03 + 0.05 * lung_soft)
    clav_y = 0.15 - 0.12 * (np.abs(ax) - 0.05) + 0.7 * (np.abs(ax) - 0.2) ** 2
    clav = np.exp(-(((y - clav_y) / 0.012) ** 2)) * _ramp(np.abs(ax) - 0.04, 0.02) * _ramp(0.33 - np.abs(ax), 0.03)
    img = img + 0.08 * clav * body
    p = s + 2 * pad
    vessels = _smooth_noise(rng, p, 20) * np.clip(1.0 - np.abs(ax) / 0.35, 0.0, 1.0)
    img = img + 0.035 * vessels * lung_soft + 0.025 * _smooth_noise(rng, p, 6) * body
    return {"x": x, "y": y, "pad": pad, "image": img, "side_dist": side_dist, "lung_d": lung_d,
            "centres": centres, "lung_a": a["lung_a"], "lung_b": lung_b}  # fmt: skip


def render_image(config: SyntheticCXRConfig, row: dict, index: int, patient: dict | None = None) -> dict:
    """Pixels of one planned image (``row`` from :func:`plan_synthetic_cxr`, ``index`` its position).

    ``patient`` is :func:`render_patient` of ``row["patient_id"]``, computed here when not given (pass it to
    reuse it across a patient's follow-ups). Returns ``image`` (uint8 (S, S)), ``lung_mask`` (bool),
    ``lesions`` (list of ``(class_name, bool mask, (x, y, w, h))``; each mask lies inside ``lung_mask``) and
    ``marker_box`` ((x, y, w, h) or ``None``).
    """
    s = config.image_size
    rng = np.random.default_rng([config.seed, 2, index])
    if patient is None:
        patient = render_patient(config, int(row["patient_id"]))
    # Positioning: this image is the canvas crop at offset (ox, oy).
    ox, oy = (int(v) for v in rng.integers(0, 2 * patient["pad"] + 1, size=2))
    crop = (slice(oy, oy + s), slice(ox, ox + s))
    x, y = patient["x"][:, crop[1]], patient["y"][crop[0], :]
    img = patient["image"][crop].copy()
    side_dist = [d[crop] for d in patient["side_dist"]]
    lung_d = patient["lung_d"][crop]
    lung_mask = lung_d > 0
    lung_soft = _ramp(lung_d, 0.02)
    lung_a, lung_b = patient["lung_a"], patient["lung_b"]

    lesions: list[tuple[str, np.ndarray, tuple[int, int, int, int]]] = []
    occupied: list[tuple[int, int, int, int]] = []
    px = 1.0 / s  # one pixel in anatomical units

    def add(name: str, profile: np.ndarray, shape: np.ndarray, amp: float, centre: int | None) -> None:
        img[...] += amp * profile * lung_soft
        mask = shape & lung_mask
        if centre is not None:
            mask.flat[centre] = True  # never empty, even at tiny sizes
        if not mask.any():
            return
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        lesions.append((name, mask, (x0, y0, x1 - x0, y1 - y0)))
        occupied.append((x0, y0, x1, y1))

    def centre_in(which: int, margin: float, radius: float) -> tuple[int, float, float]:
        idx = _candidates(side_dist[which], margin, occupied, int(radius / px) + 1)
        c = int(idx[rng.integers(len(idx))])
        return c, float(x[0, c % s]), float(y[c // s, 0])

    if row["Effusion"]:
        which = int(rng.integers(2))
        side, cx, cy = patient["centres"][which]
        lateral = np.clip(side * (x - cx) / lung_a + 1.0, 0.0, 2.0) / 2.0  # 0 medial .. 1 lateral
        level = cy + lung_b * (0.70 - rng.uniform(0.12, 0.32) - rng.uniform(0.12, 0.25) * lateral**2)
        in_side = side_dist[which] > 0
        add("Effusion", _ramp(y - level, 0.03) * (side_dist[which] > -0.02), (y > level) & in_side,
            rng.uniform(0.15, 0.26), None)  # fmt: skip
    if row["Mass"]:
        r = rng.uniform(0.055, 0.085)
        c, mx, my = centre_in(int(rng.integers(2)), 0.6 * r, r)
        theta = np.arctan2(y - my, x - mx)
        k = np.arange(2, 6)[:, None, None]
        lobes = (rng.uniform(0, 0.12, size=4)[:, None, None] * np.cos(k * theta + rng.uniform(0, 2 * np.pi, size=4)[:, None, None])).sum(0)
        dist = np.sqrt((x - mx) ** 2 + (y - my) ** 2)
        prof = _ramp(r * (1 + lobes) - dist, 0.3 * r) * (0.85 + 0.1 * _smooth_noise(rng, s, 12))
        add("Mass", prof, dist < r * (1 + lobes), rng.uniform(0.16, 0.24), c)
    if row["Infiltration"]:
        r = rng.uniform(0.07, 0.11)
        c, mx, my = centre_in(int(rng.integers(2)), 0.4 * r, r)
        phi, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
        ex = ((x - mx) * np.cos(phi) + (y - my) * np.sin(phi)) / r
        ey = (-(x - mx) * np.sin(phi) + (y - my) * np.cos(phi)) / (r * aspect)
        env = np.clip(1.0 - np.sqrt(ex**2 + ey**2), 0.0, 1.0)
        texture = np.clip(0.6 + 0.5 * _smooth_noise(rng, s, 40), 0.0, 1.0)
        add("Infiltration", np.sqrt(env) * texture, env > 0.15, rng.uniform(0.16, 0.24), c)
    if row["Nodule"]:
        for _ in range(1 + int(rng.random() < 0.25)):
            r = rng.uniform(0.016, 0.026)
            c, mx, my = centre_in(int(rng.integers(2)), r, 3 * r)
            dist = np.sqrt((x - mx) ** 2 + (y - my) ** 2)
            add("Nodule", _ramp(r - dist, max(0.3 * r, px)), dist < r, rng.uniform(0.20, 0.30), c)

    marker_box = None
    if row["marker"]:
        mx0, my0, mw, mh = marker_box = _marker_box(s, int(row["marker_corner"]))
        patch = img[my0 : my0 + mh, mx0 : mx0 + mw]
        img[my0 : my0 + mh, mx0 : mx0 + mw] = np.where(_glyph(row["marker"], mw, mh), rng.uniform(0.8, 0.95), patch)

    img = img + 0.018 * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.04), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    image = np.round(img * 255.0).astype(np.uint8)
    return {"image": image, "lung_mask": lung_mask, "lesions": lesions, "marker_box": marker_box}
