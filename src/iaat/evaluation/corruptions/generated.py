"""An offline generator of CIFAR-C style corruptions, re-implemented with torch operations.

Each function maps float images in [0, 1] of shape (N, C, H, W) to corrupted ones of the same shape. The
parameter tables are make_cifar_c.py's; comments note where its numpy/skimage/cv2/PIL behaviour is mirrored.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ImageSet
from ...data.batch import to_unit
from ...data.folder import pillow as _pillow
from ...errors import DataError
from .common import CIFAR_C_CORRUPTIONS, SEVERITIES, CorruptionItem, CorruptionSets

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _level(table: Sequence, severity: int):
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= len(table):
        raise DataError(f"severity must be an integer in 1..{len(table)}, got {severity!r}.")
    return table[severity - 1]


def _randn(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _rand(shape: Sequence[int], x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, dtype=x.dtype, device=x.device)


def _per_channel(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a single-channel 2-D filter ``fn`` ((M, 1, H, W) -> (M, 1, H', W')) to every channel."""
    n, c, h, w = x.shape
    out = fn(x.reshape(n * c, 1, h, w))
    return out.reshape(n, c, *out.shape[-2:])


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage.filters.gaussian of each channel: scipy's kernel (radius int(4 sigma + 0.5)), 'nearest' edges."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.pad(z, (radius, radius, radius, radius), mode="replicate")
        z = F.conv2d(z, k.view(1, 1, -1, 1))
        return F.conv2d(z, k.view(1, 1, 1, -1))

    return _per_channel(x, blur)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive N(0, c^2) noise."""
    c = _level([0.04, 0.06, 0.08, 0.09, 0.10], severity)
    return (x + c * _randn(x, generator)).clamp_(0, 1)


def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson (photon) noise: Poisson(c x) / c."""
    c = _level([500, 250, 100, 75, 50], severity)
    return (torch.poisson(x * c, generator=generator) / c).clamp_(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise: each value becomes 0 or 1 (even odds) with probability c, as skimage's 's&p'."""
    c = _level([0.01, 0.02, 0.03, 0.05, 0.07], severity)
    flipped = _rand(x.shape, x, generator) < c
    salt = (_rand(x.shape, x, generator) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


def speckle_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Multiplicative noise x + x N(0, c^2)."""
    c = _level([0.06, 0.1, 0.12, 0.16, 0.2], severity)
    return (x + x * c * _randn(x, generator)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with standard deviation c pixels."""
    c = _level([0.4, 0.6, 0.7, 0.8, 1.0], severity)
    return _gaussian_filter(x, c).clamp_(0, 1)


def _cv2_gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return k / k.sum()


@lru_cache(maxsize=None)
def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c.py's anti-aliased disk, cropped to where it is non-zero (the zeros would not change a sum)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _cv2_gaussian_kernel(ksize, alias_blur)
    p = ksize // 2  # cv2.GaussianBlur's default border is reflect-101, as torch's 'reflect'
    disk = F.conv2d(F.pad(disk[None, None], (p, p, p, p), mode="reflect"), (g[:, None] * g[None, :])[None, None])[0, 0]
    rows = torch.nonzero(disk.abs().sum(1)).flatten()
    r = int(max(half - rows.min(), rows.max() - half))
    return disk[half - r:half + r + 1, half - r:half + r + 1]


def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Convolution with an anti-aliased disk (cv2.filter2D, reflect-101 edges)."""
    radius, alias = _level([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)], severity)
    kernel = _disk(float(radius), float(alias)).to(x)
    r = kernel.shape[0] // 2
    if r >= min(x.shape[-2:]):
        raise DataError(f"defocus_blur needs images larger than {r} pixels, got {tuple(x.shape[-2:])}.")
    return _per_channel(x, lambda z: F.conv2d(F.pad(z, (r, r, r, r), mode="reflect"), kernel[None, None])).clamp_(0, 1)


def glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur, local pixel shuffling, Gaussian blur again.

    make_cifar_c.py "swaps" pixel rows with ``a[i], a[j] = a[j], a[i]`` on numpy views, which copies
    ``a[j]`` into ``a[i]`` and leaves ``a[j]`` alone; with its offsets in {-1, 0} and its bottom-right to
    top-left scan every copy reads a not-yet-written pixel, so one pass is a parallel gather.
    """
    sigma, delta, iterations = _level([(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)], severity)
    n, c, h, w = x.shape
    # np.uint8(... * 255) truncates; the epsilon keeps exact 8-bit levels from dropping through rounding error.
    x = torch.floor(_gaussian_filter(x, sigma) * 255 + 1e-4).clamp_(0, 255) / 255
    rows = torch.arange(delta + 1, h - delta + 1, device=x.device)  # range(h - delta, delta, -1), any order
    cols = torch.arange(delta + 1, w - delta + 1, device=x.device)
    if len(rows) == 0 or len(cols) == 0:
        raise DataError(f"glass_blur needs images larger than {2 * delta + 1} pixels, got {(h, w)}.")
    batch = torch.arange(n, device=x.device)[:, None, None]
    for _ in range(iterations):
        # np.random.randint(-delta, delta) excludes delta: offsets are -delta..delta-1.
        shape = (n, len(rows), len(cols))
        dy = torch.randint(-delta, delta, shape, generator=generator, device=x.device)
        dx = torch.randint(-delta, delta, shape, generator=generator, device=x.device)
        src = x[batch, :, rows[:, None] + dy, cols[None, :] + dx]  # (n, rows, cols, c)
        x = x.clone()
        x[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = src.permute(0, 3, 1, 2)
    return _gaussian_filter(x, sigma).clamp_(0, 1)


def _zoom_centre(x: torch.Tensor, factor: float) -> torch.Tensor:
    """make_cifar_c.py's clipped_zoom: crop the centre, zoom it back up linearly (scipy zoom, order 1)."""
    size = x.shape[-2:]
    crops = [int(math.ceil(s / factor)) for s in size]
    tops = [(s - ch) // 2 for s, ch in zip(size, crops)]
    crop = x[..., tops[0]:tops[0] + crops[0], tops[1]:tops[1] + crops[1]]
    out_size = [int(round(ch * factor)) for ch in crops]  # scipy's output shape
    # scipy.ndimage.zoom (grid_mode=False) maps the corner pixels onto each other, i.e. align_corners=True.
    zoomed = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=True)
    trims = [(o - s) // 2 for o, s in zip(out_size, size)]
    return zoomed[..., trims[0]:trims[0] + size[0], trims[1]:trims[1] + size[1]]


def zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Average of the image and centre zooms by 1, 1.01, ... (np.arange's float steps included)."""
    stop = _level([1.06, 1.11, 1.16, 1.21, 1.26], severity)
    factors = np.arange(1, stop, 0.01)
    out = x.clone()
    for factor in factors:
        out += _zoom_centre(x, float(factor))
    return (out / (len(factors) + 1)).clamp_(0, 1)


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, like: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Diamond-square height maps (n, mapsize, mapsize) in [0, 1], as make_cifar_c.py's plasma_fractal."""
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64, device=like.device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:
        # The original scales a uniform(-wibble, wibble) draw by wibble once more; kept as is.
        return a / 4 + wibble * (torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= wibbledecay
    m -= m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)


def fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A plasma-fractal haze added to every channel, rescaled to keep the image's brightest value."""
    strength, decay = _level([(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], severity)
    n, _, h, w = x.shape
    mapsize = 1 << (max(h, w, 2) - 1).bit_length()  # smallest power of two >= the image side
    haze = _plasma_fractal(n, mapsize, decay, x, generator)[:, None, :h, :w].to(x.dtype)
    top = x.amax((1, 2, 3), keepdim=True)
    return ((x + strength * haze) * top / (top + strength)).clamp_(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add c to the HSV value channel.

    With hue and saturation fixed every RGB channel scales by V'/V (skimage's rgb2hsv/hsv2rgb round trip);
    a black pixel (V = 0, hence S = 0) turns grey V'.
    """
    c = _level([0.05, 0.1, 0.15, 0.2, 0.3], severity)
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new).clamp_(0, 1)


def saturate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift the HSV saturation, S' = clip(a S + b); RGB images only.

    With V and hue fixed each channel is V - (V - c) S'/S. Grey pixels (S = 0) have hue 0 in skimage, so a
    positive shift b tints them red: (V, V (1 - S'), V (1 - S')).
    """
    a, b = _level([(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], severity)
    if x.shape[1] != 3:
        raise DataError(f"saturate needs RGB images (3 channels), got {x.shape[1]}.")
    v = x.amax(1, keepdim=True)
    spread = v - x.amin(1, keepdim=True)
    s = torch.where(v > 0, spread / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    red_hue = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = v - v * s_new * red_hue
    return torch.where(s > 0, coloured, grey).clamp_(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every channel towards its mean over the image by the factor c."""
    c = _level([0.75, 0.5, 0.4, 0.3, 0.15], severity)
    means = x.mean((2, 3), keepdim=True)
    return ((x - means) * c + means).clamp_(0, 1)


@lru_cache(maxsize=None)
def _pil_box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The (out_size, in_size) weights of Pillow's BOX resampling along one axis (Resample.c precompute_coeffs)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            weights[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = weights[i].sum()
        if total > 0:
            weights[i] /= total
    return weights


def _pil_box_resize(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's Image.resize(..., BOX) of 8-bit levels 0..255: a horizontal then a vertical pass, each rounded
    half up to whole levels as Pillow's fixed-point code does."""
    h, w = levels.shape[-2:]
    if (h, w) == tuple(size):
        return levels
    levels = torch.floor(levels @ _pil_box_matrix(w, size[1]).to(levels).T + 0.5)
    return torch.floor(_pil_box_matrix(h, size[0]).to(levels) @ levels + 0.5)


def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Box-downsample to a fraction c of the side and box-upsample back (Pillow's BOX filter on 8-bit images)."""
    c = _level([0.95, 0.9, 0.85, 0.75, 0.65], severity)
    h, w = x.shape[-2:]
    levels = (x * 255).round().clamp_(0, 255)  # Pillow resizes 8-bit images; exact levels keep its ties exact
    small = _pil_box_resize(levels, (max(int(h * c), 1), max(int(w * c), 1)))
    return (_pil_box_resize(small, (h, w)) / 255).clamp_(0, 1)


def jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Save each image as a JPEG of quality c with Pillow's defaults and decode it again."""
    quality = _level([80, 65, 58, 50, 40], severity)
    image_cls = _pillow("the jpeg_compression corruption")
    if x.shape[1] not in (1, 3):
        raise DataError(f"jpeg_compression needs grey or RGB images (1 or 3 channels), got {x.shape[1]}.")
    pixels = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):
        buffer = io.BytesIO()
        image_cls.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(image_cls.open(buffer)).reshape(img.shape)
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


#: Corruptions the generator implements, in the order of :data:`CIFAR_C_CORRUPTIONS`.
GENERATED_CORRUPTIONS: dict[str, CorruptionFn] = {
    fn.__name__: fn for fn in sorted(
        [gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, zoom_blur, fog, brightness, contrast,
         pixelate, jpeg_compression, speckle_noise, gaussian_blur, saturate],
        key=lambda fn: CIFAR_C_CORRUPTIONS.index(fn.__name__))
}


#: Corruptions defined on colour only (saturate scales the HSV saturation): left out of the default set on
#: grey images, an error where named.
RGB_ONLY = ("saturate",)


def _seed_for(seed: int, name: str, severity: int) -> int:
    """A seed per (corruption, severity) that does not depend on which other corruptions are generated."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), severity]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generated_corruption_sets(data: ImageSet, names: Optional[Iterable[str]] = None, n: Optional[int] = None,
                              seed: int = 0, chunk_size: int = 1000) -> CorruptionSets:
    """Corrupt (the first ``n`` images of) ``data`` at severities 1..5 with :data:`GENERATED_CORRUPTIONS`.

    Deterministic for a given ``seed``: each (corruption, severity) draws from its own generator, so a subset
    of ``names`` gives the same images as the full run. Images are uint8 in and out, rounded to the nearest
    level (the released files truncate with ``np.uint8``, half a level darker on average).

    Args:
        data: clean images, uint8 (N, C, H, W).
        names: corruptions to generate (default: all of :data:`GENERATED_CORRUPTIONS`, without the
            :data:`RGB_ONLY` ones on images that are not RGB, with a warning; named, those are an error there).
        n: use the first ``n`` images (all when None or larger than N).
        seed: base seed.
        chunk_size: images corrupted at once (bounds memory; part of what the seed reproduces).

    Returns:
        A :class:`CorruptionSets` yielding ``(name, severity, ImageSet)``, labelled as not comparable with
        CIFAR-C; its ``missing`` lists the CIFAR-C corruptions it leaves out.
    """
    if not isinstance(data, ImageSet):
        raise DataError(f"data must be an ImageSet, got {type(data).__name__}.")
    if len(data) == 0:
        raise DataError("data holds no images to corrupt.")
    chosen = names is not None  # named by the caller: an RGB-only one on other images is an error, not skipped
    names = list(GENERATED_CORRUPTIONS) if names is None else list(names)
    unknown = [name for name in names if name not in GENERATED_CORRUPTIONS]
    if unknown or not names:
        raise DataError(f"cannot generate {', '.join(unknown) or 'an empty list of corruptions'}; "
                        f"known: {', '.join(GENERATED_CORRUPTIONS)}.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive number of images, got {n!r}.")
    if not torch.is_tensor(data.x):  # an image folder: decode the images to corrupt once
        data = ImageSet(data.x[:n], data.y[:n])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DataError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    channels = data.x.shape[1]
    rgb_only = [name for name in names if name in RGB_ONLY]
    if rgb_only and channels != 3:
        if chosen:
            raise DataError(f"{', '.join(rgb_only)} needs RGB images (3 channels), got {channels}; leave it out of "
                            f"names.")
        names = [name for name in names if name not in RGB_ONLY]
        warnings.warn(f"generated corruptions: {', '.join(rgb_only)} skipped, it needs RGB images (3 channels) and "
                      f"these have {channels}.", stacklevel=2)
    if "jpeg_compression" in names:
        _pillow("the jpeg_compression corruption")  # fail now, not after the other corruptions have run
    take = len(data) if n is None else min(n, len(data))
    clean = data.subset(torch.arange(take))

    def items() -> Iterator[CorruptionItem]:
        for name in names:
            fn = GENERATED_CORRUPTIONS[name]
            for severity in SEVERITIES:
                generator = torch.Generator(device=clean.x.device).manual_seed(_seed_for(seed, name, severity))
                out = torch.empty_like(clean.x)
                for lo in range(0, take, chunk_size):
                    x = to_unit(clean.x[lo:lo + chunk_size])
                    out[lo:lo + chunk_size] = fn(x, severity, generator).mul(255).round_().clamp_(0, 255).to(torch.uint8)
                yield name, severity, ImageSet(out, clean.y.clone())

    return CorruptionSets(items(), names, take, f"generated with torch (seed {seed}, {take} images per severity)",
                          comparable_with_cifar_c=False)
