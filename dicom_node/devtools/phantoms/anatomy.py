"""The 3-D lumbar spine model the MR and CT phantoms render: tissue labels, MR and CT values, vertebrae."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from dicom_node.devtools.phantoms.common import FloatArray, UInt8Array, _rounded_box_sdf

__all__ = []

# --------------------------------------------------------------------------------------
# 3-D lumbar spine model (MR and CT)
# --------------------------------------------------------------------------------------

# Tissue labels
_AIR, _FAT, _MUSCLE, _VISCERA, _CSF, _CORD, _CAUDA = 0, 1, 2, 3, 4, 5, 6
_ANNULUS, _NUCLEUS, _MARROW, _CORTEX, _POSTERIOR, _HERNIA, _VESSEL = 7, 8, 9, 10, 11, 12, 13
_DEGEN_NUCLEUS, _FRACTURE_MARROW = 14, 15
_N_LABELS = 16

#            air  fat   musc visc csf   cord cauda ann  nucl marrow cortex post hern vess degen fract
_T2 = np.array([0, 1300, 380, 650, 2300, 760, 620, 360, 1900, 780, 110, 640, 330, 70, 480, 700], float)
_T1 = np.array([0, 1750, 620, 820, 330, 820, 700, 560, 640, 1180, 140, 1050, 560, 70, 520, 1000], float)
_HU = np.array([-1000, -100, 55, 25, 10, 35, 30, 90, 75, 250, 800, 600, 85, 40, 80, 420], float)

_LUMBAR_LEVELS: Final = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
# body height (mm), lateral semi-axis a, AP semi-axis b, tilt (rad; + = moving caudally goes posterior)
_LUMBAR_BODY: Final = {
    "T9": (20.0, 17.0, 13.0, -0.12),
    "T10": (21.0, 18.0, 13.5, -0.12),
    "T11": (22.0, 19.0, 14.0, -0.11),
    "T12": (23.0, 20.0, 14.5, -0.09),
    "L1": (24.0, 21.0, 15.0, -0.06),
    "L2": (25.0, 22.0, 15.5, 0.0),
    "L3": (26.0, 23.0, 16.0, 0.08),
    "L4": (26.0, 24.0, 16.5, 0.18),
    "L5": (25.0, 25.0, 17.0, 0.32),
    "S1": (24.0, 24.0, 16.0, 0.60),
    "S2": (20.0, 19.0, 12.0, 0.80),
    "S3": (16.0, 15.0, 9.0, 0.95),
}
_DISC_HEIGHT: Final = {
    "T9-T10": 5.0, "T10-T11": 5.5, "T11-T12": 6.0, "T12-L1": 7.0, "L1-L2": 9.0, "L2-L3": 10.0,
    "L3-L4": 11.0, "L4-L5": 11.0, "L5-S1": 10.0, "S1-S2": 3.0, "S2-S3": 2.5,
}
_FUSED: Final = frozenset({"S1-S2", "S2-S3"})
_CANAL_AX, _CANAL_AY = 11.0, 8.0


@dataclass(frozen=True)
class _Segment:
    name: str
    disc: bool
    cy: float
    cz: float
    phi: float
    half_h: float
    a: float
    b: float
    canal_u: float  # canal centre along the local posterior axis


@dataclass(frozen=True)
class _Local:
    """A segment and the flat indices / local coordinates of the points near it."""

    seg: _Segment
    idx: NDArray[np.intp]
    x: FloatArray
    u: FloatArray
    v: FloatArray


_CAUDA_ROOTS: Final = ((-4.5, 2.5), (4.5, 2.5), (-2.0, 4.5), (2.0, 4.5), (0.0, 5.5), (-6.5, 0.0), (6.5, 0.0))


@dataclass(frozen=True)
class _SpineModel:
    segments: tuple[_Segment, ...]
    herniation: str | None
    fracture: str | None
    gas: tuple[tuple[float, float, float, float], ...]

    def vertebra(self, name: str) -> _Segment:
        return next(s for s in self.segments if s.name == name)


def _build_lumbar_model(
    rng: np.random.Generator,
    *,
    herniation: str | None = None,
    fracture: str | None = None,
    l3_z: float = -5.0,
    body_y: float = 20.0,
) -> _SpineModel:
    """Walk down the lordotic curve and place bodies and discs (LPS mm)."""
    scale = float(rng.uniform(0.96, 1.04))
    lordosis = float(rng.uniform(0.85, 1.15))
    heights = {k: v[0] * scale for k, v in _LUMBAR_BODY.items()}
    discs = {k: v * scale for k, v in _DISC_HEIGHT.items()}
    if fracture is not None:
        heights[fracture] *= 0.72
    if herniation is not None:
        discs[herniation] *= 0.75
    phis = {k: v[3] * lordosis for k, v in _LUMBAR_BODY.items()}

    def step(phi: float, dist: float) -> tuple[float, float]:
        return math.sin(phi) * dist, -math.cos(phi) * dist

    raw: list[tuple[str, bool, float, float, float, float, float, float]] = []
    y, z = 0.0, 0.0
    for i, name in enumerate(_LUMBAR_LEVELS):
        _, a, b, _ = _LUMBAR_BODY[name]
        raw.append((name, False, y, z, phis[name], heights[name] / 2.0, a, b))
        if i + 1 == len(_LUMBAR_LEVELS):
            break
        nxt = _LUMBAR_LEVELS[i + 1]
        dname = f"{name}-{nxt}"
        dphi = 0.5 * (phis[name] + phis[nxt])
        dy, dz = step(phis[name], heights[name] / 2.0)
        y, z = y + dy, z + dz
        dy2, dz2 = step(dphi, discs[dname] / 2.0)
        _, a2, b2, _ = _LUMBAR_BODY[nxt]
        raw.append((dname, True, y + dy2, z + dz2, dphi, discs[dname] / 2.0, 0.5 * (a + a2), 0.5 * (b + b2)))
        dy3, dz3 = step(dphi, discs[dname])
        y, z = y + dy3, z + dz3
        dy4, dz4 = step(phis[nxt], heights[nxt] / 2.0)
        y, z = y + dy4, z + dz4
    l3 = next(r for r in raw if r[0] == "L3")
    oy, oz = body_y - l3[2], l3_z - l3[3]
    segments = tuple(
        _Segment(name, disc, cy + oy, cz + oz, phi, hh, a, b, b + 2.5 + _CANAL_AY)
        for name, disc, cy, cz, phi, hh, a, b in raw
    )
    gas = tuple(
        (
            float(rng.uniform(-90, 90)),
            float(rng.uniform(-100, -45)),
            float(rng.uniform(-140, 140)),
            float(rng.uniform(7, 18)),
        )
        for _ in range(10)
    )
    return _SpineModel(segments, herniation, fracture, gas)


def _spine_labels(model: _SpineModel, x: FloatArray, y: FloatArray, z: FloatArray) -> UInt8Array:
    """Tissue label at each LPS point (all arrays share one shape)."""
    segs = model.segments
    lab = np.full(x.shape, _AIR, dtype=np.uint8)
    # float32 keeps the many element-wise operations cheap; 0.01 mm precision is plenty.
    x, y, z = x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)

    # Curves as functions of z (interpolated between segment centres).
    order = sorted(segs, key=lambda s: s.cz)
    zs = np.array([s.cz for s in order])
    canal_y = np.interp(z, zs, [s.cy + s.canal_u * math.cos(s.phi) for s in order])
    front_y = np.interp(z, zs, [s.cy - s.b * math.cos(s.phi) for s in order])
    half_width = np.interp(z, zs, [s.a for s in order])

    # Torso, subcutaneous fat, muscles, vessels, bowel gas.
    torso = (x / 145.0) ** 2 + (y / 115.0) ** 2
    lab[torso <= 1.0] = _FAT
    viscera = (x / 130.0) ** 2 + (y / 101.0) ** 2
    lab[viscera <= 1.0] = _VISCERA
    for gx, gy, gz, gr in model.gas:
        if float(z.min()) > gz + gr or float(z.max()) < gz - gr:
            continue
        lab[((x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= gr * gr) & (viscera <= 0.8)] = _AIR
    for side in (-1.0, 1.0):
        erector = ((x - side * 30.0) / 21.0) ** 2 + ((y - canal_y - 30.0) / 24.0) ** 2 <= 1.0
        lab[erector & (torso <= 1.0)] = _MUSCLE
        l1z = model.vertebra("L1").cz
        psoas_r = np.clip((l1z - z) / 60.0, 0.0, 1.0)
        psoas = ((x - side * (half_width + 14.0)) / (5.0 + 10.0 * psoas_r)) ** 2 + (
            (y - front_y - 14.0) / (6.0 + 11.0 * psoas_r)
        ) ** 2 <= 1.0
        lab[psoas & (psoas_r > 0)] = _MUSCLE
    l4z = model.vertebra("L4").cz
    above = z > l4z
    aorta = (x - 14.0) ** 2 + (y - front_y + 13.0) ** 2 <= 100.0
    ivc = ((x + 22.0) / 12.0) ** 2 + ((y - front_y + 10.0) / 8.0) ** 2 <= 1.0
    lab[(aorta | ivc) & above] = _VESSEL
    for side in (-1.0, 1.0):
        iliac = (x - side * (10.0 + 0.35 * (l4z - z))) ** 2 + (y - front_y + 14.0) ** 2 <= 40.0
        lab[iliac & ~above & (torso <= 0.9)] = _VESSEL

    # Local coordinates per segment, only for the points near it (flat index sets).
    flat = lab.reshape(-1)
    fx, fy, fz = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    zmin, zmax = float(fz.min()), float(fz.max())
    local: list[_Local] = []
    for s in segs:
        reach = s.half_h + (4.0 if s.disc else 32.0)
        u_lo, u_hi = -s.b - 4.0, s.b + 62.0
        # Bounding box (y, z) of the segment's local box (u in [u_lo, u_hi], |v| <= reach).
        cs, sn = math.cos(s.phi), math.sin(s.phi)
        corners_y = [s.cy + uu * cs - vv * sn for uu in (u_lo, u_hi) for vv in (-reach, reach)]
        corners_z = [s.cz + uu * sn + vv * cs for uu in (u_lo, u_hi) for vv in (-reach, reach)]
        z_lo, z_hi = min(corners_z), max(corners_z)
        if z_hi < zmin or z_lo > zmax:
            continue
        cand = np.flatnonzero((fz >= z_lo) & (fz <= z_hi))
        cand = cand[(fy[cand] >= min(corners_y)) & (fy[cand] <= max(corners_y)) & (np.abs(fx[cand]) <= 70.0)]
        dy, dz = fy[cand] - s.cy, fz[cand] - s.cz
        v = -sn * dy + cs * dz
        u = cs * dy + sn * dz
        keep = (np.abs(v) <= reach) & (u >= u_lo) & (u <= u_hi)
        if keep.any():
            local.append(_Local(s, cand[keep], fx[cand[keep]], u[keep], v[keep]))

    conus = model.vertebra("L1")
    # Pass 1: canal (CSF), cord and cauda equina.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        extent = np.abs(v) <= s.half_h + 2.0
        cu = u - s.canal_u
        sacral = s.name.startswith("S")
        ax, ay = (_CANAL_AX * 0.7, _CANAL_AY * 0.6) if sacral else (_CANAL_AX, _CANAL_AY)
        flat[loc.idx[extent & ((xx / ax) ** 2 + (cu / ay) ** 2 <= 1.0)]] = _CSF
        above_conus = s.cz > conus.cz + conus.half_h
        if above_conus or s is conus:
            taper = np.ones_like(v) if above_conus else np.clip((v + 0.3 * s.half_h) / s.half_h, 0.0, 1.0)
            cord = (xx / (5.0 * taper + 1e-6)) ** 2 + ((cu + 0.5) / (4.0 * taper + 1e-6)) ** 2 <= 1.0
            flat[loc.idx[extent & cord]] = _CORD
        if not above_conus and not sacral:
            for ox, ou in _CAUDA_ROOTS:
                flat[loc.idx[extent & ((xx - ox) ** 2 + (cu - ou) ** 2 <= 1.3)]] = _CAUDA

    # Pass 2: discs.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if not s.disc:
            continue
        qx = (np.sqrt((xx / (s.a + 1.0)) ** 2 + (u / (s.b + 1.0)) ** 2) - 1.0) * (s.b + 1.0)
        qy = np.abs(v) - (s.half_h + 1.5)
        disc = _rounded_box_sdf(qx, qy, 1.5) <= 0.0
        if s.name in _FUSED:
            flat[loc.idx[disc]] = _CORTEX
            continue
        flat[loc.idx[disc]] = _ANNULUS
        nucleus = (xx / (0.6 * s.a)) ** 2 + ((u + 0.1 * s.b) / (0.55 * s.b)) ** 2 + (
            v / (0.75 * s.half_h)
        ) ** 2 <= 1.0
        flat[loc.idx[disc & nucleus]] = _DEGEN_NUCLEUS if s.name == model.herniation else _NUCLEUS

    # Pass 3: vertebral bodies and posterior elements.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if s.disc:
            continue
        half_h: FloatArray | float = s.half_h
        if s.name == model.fracture:
            half_h = s.half_h * (0.78 + 0.22 * np.clip((u + s.b) / (2.0 * s.b), 0.0, 1.0))
        xa, ub = xx / s.a, u / s.b
        r = np.sqrt(xa * xa + ub * ub)
        d = _rounded_box_sdf((r - 1.0) * s.b, np.abs(v) - half_h, 2.5)
        body = d <= 0.0
        flat[loc.idx[body]] = _CORTEX
        marrow = _FRACTURE_MARROW if s.name == model.fracture else _MARROW
        flat[loc.idx[body & (d <= -1.3)]] = marrow

        cu = u - s.canal_u
        hh = s.half_h
        ring = ((xx / (_CANAL_AX + 6.0)) ** 2 + (cu / (_CANAL_AY + 6.0)) ** 2 <= 1.0) & (
            (xx / _CANAL_AX) ** 2 + (cu / _CANAL_AY) ** 2 > 1.0
        )
        arch = ring & (u > s.b) & (v >= -0.55 * hh) & (v <= 0.9 * hh)
        spinous_u = cu - (_CANAL_AY + 3.0)
        spinous = (np.abs(xx) <= 3.5) & (spinous_u >= 0.0) & (spinous_u <= 30.0) & (
            np.abs(v + 0.35 * spinous_u + 0.1 * hh) <= 0.45 * hh
        )
        abs_x = np.abs(xx)
        facets = (abs_x >= _CANAL_AX + 2.0) & (abs_x <= _CANAL_AX + 10.0) & (cu >= -3.0) & (
            cu <= _CANAL_AY + 3.0
        ) & (v >= -hh - 9.0) & (v <= 0.5 * hh)
        posterior = arch | spinous | facets
        if s.name.startswith("L"):  # transverse processes
            posterior |= (abs_x >= _CANAL_AX + 4.0) & (abs_x <= _CANAL_AX + 34.0) & (
                np.abs(cu + 2.0) <= 4.0
            ) & (
                np.abs(v - 0.05 * hh) <= 0.3 * hh
            )
        elif s.name.startswith("S"):  # sacral ala
            posterior |= (abs_x >= s.a - 4.0) & (abs_x <= s.a + 38.0) & (np.abs(u) <= s.b) & (np.abs(v) <= hh)
        sel = loc.idx[posterior]
        flat[sel[flat[sel] != _CSF]] = _POSTERIOR

    # Pass 4: herniated disc material bulging posteriorly (and to the left) into the canal.
    for loc in local:
        s, xx, u, v = loc.seg, loc.x, loc.u, loc.v
        if s.name == model.herniation:
            blob = ((xx - 4.0) / 8.0) ** 2 + ((u - s.b - 3.0) / 5.5) ** 2 + ((v + 1.5) / 6.0) ** 2 <= 1.0
            flat[loc.idx[blob]] = _HERNIA
    return lab


def _render(
    model: _SpineModel,
    tables: Sequence[FloatArray],
    points: Callable[[float], tuple[FloatArray, FloatArray, FloatArray]],
    offsets: Sequence[float],
) -> list[FloatArray]:
    """Average tissue values over sub-slice ``offsets`` (partial-volume effect)."""
    acc = [np.zeros(()) for _ in tables]
    for off in offsets:
        px, py, pz = points(off)
        lab = _spine_labels(model, px, py, pz)
        acc = [a + t[lab] for a, t in zip(acc, tables, strict=True)]
    return [a / len(offsets) for a in acc]


