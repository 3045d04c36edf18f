"""The photographed scene: background, perspective placement, hand occluder, capture degradations, frames.

Geometry is a homography from document pixels to image pixels; the image (bilinear) and ``card_mask``
(nearest) are warped with the same one, so the mask agrees with the rendered pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from idrecog.synth.templates import Box

VISIBILITY_P = {"full": 0.65, "partial": 0.27, "none": 0.08}


# ------------------------------------------------------------------------------------------------ geometry
def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with dst ~ H @ src for 4 point pairs (src, dst: [4, 2])."""
    a = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    h = np.linalg.solve(np.asarray(a, np.float64), dst.reshape(-1).astype(np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _pil_coeffs(h: np.ndarray) -> tuple[float, ...]:
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return tuple(float(v) for v in inv.reshape(-1)[:8])


def warp(img: Image.Image, h: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """Warp ``img`` (document pixels) into an image of ``size`` (W, H); outside is 0."""
    return img.transform(size, Image.Transform.PERSPECTIVE, _pil_coeffs(h), resample=resample)


@dataclass
class Placement:
    h: np.ndarray  # document -> image homography
    corners: np.ndarray  # [4, 2] image coordinates of the document corners
    mode: str  # the visibility the placement aimed at (the label is measured afterwards)
    occluder: bool


def sample_placement(rng: np.random.Generator, doc_size: tuple[int, int], size: tuple[int, int]) -> Placement:
    """Scale, rotation, perspective and position of the document in an image of ``size`` (W, H)."""
    W, H = size
    dw, dh = doc_size
    mode = str(rng.choice(list(VISIBILITY_P), p=list(VISIBILITY_P.values())))
    occluder = mode == "partial" and rng.random() < 0.4
    src = np.array([[0, 0], [dw, 0], [dw, dh], [0, dh]], np.float64)
    scale = rng.uniform(0.6, 0.95) if mode != "none" else rng.uniform(0.5, 0.9)
    angle = np.deg2rad(np.clip(rng.normal(0, 7), -18, 18))
    persp = rng.uniform(0.0, 0.07)
    for _ in range(30):
        tw = scale * W
        th = tw * dh / dw
        base = np.array([[-tw / 2, -th / 2], [tw / 2, -th / 2], [tw / 2, th / 2], [-tw / 2, th / 2]])
        base = base + rng.uniform(-persp, persp, (4, 2)) * [tw, th]
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        rel = base @ rot.T
        lo, hi = rel.min(0), rel.max(0)
        ext = hi - lo
        if mode == "full" or occluder:
            free_lo, free_hi = -lo + 1, np.array([W, H]) - hi - 1
            if np.all(free_hi >= free_lo):
                c = rng.uniform(free_lo, free_hi)
                break
            scale *= 0.92
            continue
        # cut by the frame: push the centre past one or two edges
        inside = rng.uniform(0.5, 0.9) if mode == "partial" else rng.uniform(0.04, 0.16)
        c = (
            rng.uniform(-lo, np.array([W, H]) - hi)
            if np.all(np.array([W, H]) - hi >= -lo)
            else np.array([W, H]) / 2
        )
        axis = int(rng.integers(2)) if rng.random() < 0.8 else -1
        for ax in [axis] if axis >= 0 else [0, 1]:
            inside_ax = inside if axis >= 0 else np.sqrt(inside)
            if rng.random() < 0.5:  # out on the low side
                c[ax] = -lo[ax] - (1 - inside_ax) * ext[ax]
            else:
                c[ax] = [W, H][ax] - hi[ax] + (1 - inside_ax) * ext[ax]
        break
    dst = rel + c
    return Placement(homography(src, dst), dst, mode, occluder)


# ------------------------------------------------------------------------------------------------ background
def background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A desk-like backdrop [H, W, 3] float32 0..255: noise texture, wood stripes or a gradient."""
    W, H = size
    kind = int(rng.integers(3))
    base = rng.uniform(40, 220, 3)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    base = base.astype(np.float32)
    if kind == 0:  # smooth noise texture
        lo = rng.uniform(0, 255, (H // 8 + 2, W // 8 + 2)).astype(np.uint8)
        tex = np.asarray(Image.fromarray(lo).resize((W, H), Image.Resampling.BICUBIC), np.float32)[..., None]
        img = base + (tex - 128) * np.float32(rng.uniform(0.06, 0.2))
    elif kind == 1:  # wood: warped stripes
        a = rng.uniform(0, np.pi)
        t = x * np.cos(a) + y * np.sin(a)
        f = rng.uniform(0.08, 0.25)
        s = np.sin(t * f + 3 * np.sin(t * 0.02 + y * 0.01))[..., None]
        wood = np.array([rng.uniform(110, 190), rng.uniform(70, 120), rng.uniform(30, 70)])
        img = wood * (0.85 + 0.15 * s)
    else:  # gradient
        c2 = rng.uniform(40, 220, 3)
        a = rng.uniform(0, 2 * np.pi)
        t = ((x * np.cos(a) + y * np.sin(a)) / np.hypot(W, H) + 0.5)[..., None]
        img = base * (1 - t) + c2 * t
    img = img + rng.standard_normal((H, W, 3), dtype=np.float32) * 4
    return np.clip(img, 0, 255, dtype=np.float32)


def hand_mask(rng: np.random.Generator, corners: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A hand-like occluder (palm + fingers, rounded shapes) over one document edge; L mask at ``size``."""
    W, H = size
    m = Image.new("L", (W * 2, H * 2), 0)  # drawn at 2x, downsampled for soft edges
    d = ImageDraw.Draw(m)
    e = int(rng.integers(4))
    p0, p1 = corners[e] * 2, corners[(e + 1) % 4] * 2
    t = rng.uniform(0.2, 0.8)
    at = p0 + t * (p1 - p0)
    centre = corners.mean(0) * 2
    inward = (centre - at) / (np.linalg.norm(centre - at) + 1e-6)
    side = np.array([-inward[1], inward[0]])
    edge_len = np.linalg.norm(p1 - p0)
    r = edge_len * rng.uniform(0.12, 0.2)
    palm = at - inward * r * 0.9
    d.ellipse([palm[0] - r, palm[1] - r, palm[0] + r, palm[1] + r], fill=255)
    reach = r * rng.uniform(1.3, 2.2)
    fw = max(2.0, r * 0.32)
    for k in range(int(rng.integers(1, 4))):
        base = palm + side * (k - 1) * fw * 1.1
        tip = base + inward * reach * (1 - 0.15 * abs(k - 1))
        d.line([tuple(base), tuple(tip)], fill=255, width=round(fw))
        d.ellipse([tip[0] - fw / 2, tip[1] - fw / 2, tip[0] + fw / 2, tip[1] + fw / 2], fill=255)
    return m.resize((W, H), Image.Resampling.BILINEAR)


# ------------------------------------------------------------------------------------------------ degradations
@dataclass
class Capture:
    """Capture degradations (all applied in this order); severities feed ``image_quality``."""

    light: float  # gain, 1 = well lit, down to 0.35
    glare: float  # glare spot peak, 0..1
    glare_at: tuple[float, float]
    glare_r: float
    defocus: float  # Gaussian sigma, image pixels, 0..2.5
    motion: int  # motion blur length, image pixels, 0..9
    motion_angle: float
    noise: float  # Gaussian noise std (0..255 scale), 0..20
    jpeg: int  # JPEG quality 25..95
    #: blur lengths, radii and pattern periods are given for a 256-pixel-wide image and scaled by this, so a
    #: higher resolution shows the same scene rather than a sharper one
    px_scale: float = 1.0

    def severities(self) -> dict[str, float]:
        return {
            "defocus": self.defocus / 2.5,
            "motion": max(self.motion - 1, 0) / 8,
            "noise": self.noise / 20,
            "dark": (1 - self.light) / 0.65,
            "glare": self.glare,
            "jpeg": (95 - self.jpeg) / 70,
        }

    def quality(self) -> float:
        """image_quality = prod_k (1 - w_k s_k), each severity s_k in [0, 1]: 1 = sharp, clean, well lit."""
        s = self.severities()
        q = 1.0
        for k, w in QUALITY_WEIGHTS.items():
            q *= 1 - w * min(max(s[k], 0.0), 1.0)
        return float(min(max(q, 0.0), 1.0))


QUALITY_WEIGHTS = {"defocus": 0.6, "motion": 0.6, "noise": 0.45, "dark": 0.55, "glare": 0.35, "jpeg": 0.35}


def sample_capture(rng: np.random.Generator, corners: np.ndarray, width: int = 256) -> Capture:
    """The degradations of one capture; ``width`` of the image sets the pixel scale (256 = 1)."""
    # one latent "how bad is this capture" spreads image_quality over the range
    bad = rng.beta(1.2, 1.4)

    def sev() -> float:
        return float(bad * rng.uniform(0.3, 1.0)) if rng.random() < 0.4 + 0.5 * bad else 0.0

    c = corners.mean(0) + rng.uniform(-0.3, 0.3, 2) * (corners.max(0) - corners.min(0))
    motion = round(sev() * 8)
    return Capture(
        light=1 - 0.65 * sev(),
        glare=sev(),
        glare_at=(float(c[0]), float(c[1])),
        glare_r=float(rng.uniform(8, 30)),
        defocus=2.5 * sev(),
        motion=motion + 1 if motion > 0 else 0,
        motion_angle=float(rng.uniform(0, np.pi)),
        noise=20 * sev(),
        jpeg=int(95 - 70 * sev()),
        px_scale=width / 256,
    )


def frame_capture(rng: np.random.Generator, main: Capture) -> Capture:
    """Another frame of the same hand-held capture session: its own exposure, focus, shake, noise and
    compression (the phone re-meters and refocuses for every frame); no glare of its own."""
    motion = int(rng.integers(0, 4))
    return Capture(
        light=float(np.clip(main.light * rng.uniform(0.8, 1.2), 0.35, 1.2)),
        glare=0.0,
        glare_at=main.glare_at,
        glare_r=main.glare_r,
        defocus=float(rng.uniform(0.0, 1.2)),
        motion=motion + 1 if motion > 1 else 0,
        motion_angle=float(rng.uniform(0, np.pi)),
        noise=float(rng.uniform(2, 8)),
        jpeg=int(rng.integers(60, 93)),
        px_scale=main.px_scale,
    )


def jitter_placement(
    rng: np.random.Generator, doc_size: tuple[int, int], corners: np.ndarray, amount: float
) -> tuple[np.ndarray, np.ndarray]:
    """A hand-held re-capture of the same placement: the document moved, turned and tilted a little (each corner
    by up to ``amount`` of the document's extent, plus a shift and a turn of the whole). Returns (homography
    document -> image, corners)."""
    dw, dh = doc_size
    ext = corners.max(0) - corners.min(0)
    c = corners.mean(0)
    a = np.deg2rad(rng.uniform(-3, 3))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = (corners - c) @ rot.T + c + rng.uniform(-amount, amount, 2) * ext
    moved = moved + rng.uniform(-amount, amount, (4, 2)) * ext
    src = np.array([[0, 0], [dw, 0], [dw, dh], [0, dh]], np.float64)
    return homography(src, moved), moved


def screen_replay(img: np.ndarray, rng: np.random.Generator, px_scale: float = 1.0) -> np.ndarray:
    """The capture of a document shown on a screen (a presentation attack): the display's pixel grid beats with
    the camera's (a moiré of two slightly turned gratings), the screen's colour cast and its lifted blacks.
    img: [H, W, 3] float 0..255 -> the same."""
    H, W = img.shape[:2]
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    moire = np.zeros((H, W), np.float32)
    # a fine grating and the coarser beat it makes with the sensor (the beat survives defocus)
    for lo, hi in ((3.0, 5.0), (8.0, 14.0)):
        period = float(rng.uniform(lo, hi)) * px_scale
        a = float(rng.uniform(-0.35, 0.35)) + float(rng.choice([0.0, np.pi / 2]))
        moire += np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)
    cast = np.array([rng.uniform(-10, 0), rng.uniform(-4, 6), rng.uniform(8, 24)], np.float32)
    out = img * np.float32(rng.uniform(0.78, 0.9)) + np.float32(rng.uniform(18, 34)) + cast
    return out + moire[..., None] * np.float32(rng.uniform(7, 13))


def _motion_blur(img: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Average of ``length`` copies shifted along the motion direction (edges replicated)."""
    H, W = img.shape[:2]
    pad = length
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    acc = np.zeros_like(img)
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, length):
        dx, dy = round(t * np.cos(angle)), round(t * np.sin(angle))
        acc += p[pad + dy : pad + dy + H, pad + dx : pad + dx + W]
    return acc * np.float32(1 / length)


def degrade(img: np.ndarray, cap: Capture, rng: np.random.Generator, *, flash: float = 0.0) -> bytes:
    """Apply ``cap`` to an [H, W, 3] float image and return the JPEG bytes. ``flash`` brightens (flash frame)."""
    H, W = img.shape[:2]
    out = img * np.float32(cap.light)
    if flash > 0:  # an on-camera flash lights the whole scene and leaves a soft hot spot in the middle
        y, x = np.ogrid[0:H, 0:W]
        g = np.exp(-((x - W / 2) ** 2 + (y - H / 2) ** 2) / (2 * (0.35 * W) ** 2)).astype(np.float32)
        out = out * np.float32(1 + 0.35 * flash) + np.float32(60 * flash) * g[..., None]
    k = cap.px_scale
    if cap.glare > 0:
        y, x = np.ogrid[0:H, 0:W]
        r = cap.glare_r * k
        g = np.exp(-((x - cap.glare_at[0]) ** 2 + (y - cap.glare_at[1]) ** 2) / (2 * r**2))
        out = out + (255 * cap.glare * g[..., None]).astype(np.float32)
    if cap.defocus > 0.3:
        pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(cap.defocus * k)
        )
        out = np.asarray(pil, np.float32)
    if cap.motion > 1:
        out = _motion_blur(out, max(2, round(cap.motion * k)), cap.motion_angle)
    if cap.noise > 0:
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(cap.noise)
    pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=cap.jpeg)
    return buf.getvalue()


def box_in_image(
    h: np.ndarray, box: Box, size: tuple[int, int], min_inside: float = 0.3
) -> list[float] | None:
    """Axis-aligned image box of a document-pixel box, clipped; None when under ``min_inside`` of it is inside."""
    x0, y0, x1, y1 = box
    p = project(h, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
    bx0, by0 = p.min(0)
    bx1, by1 = p.max(0)
    W, H = size
    cx0, cy0, cx1, cy1 = max(bx0, 0), max(by0, 0), min(bx1, W), min(by1, H)
    full = (bx1 - bx0) * (by1 - by0)
    if cx1 <= cx0 or cy1 <= cy0 or full <= 0 or (cx1 - cx0) * (cy1 - cy0) < min_inside * full:
        return None
    return [round(float(v), 2) for v in (cx0, cy0, cx1, cy1)]


def soften(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(0.6))
