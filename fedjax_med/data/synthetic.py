"""Synthetic twins of ChestX-ray14 and BraTS, generated in vectorised numpy.

`synthetic_cxr` draws chest-radiograph-like images: a thorax with two lung fields, mediastinum and
spine, heart, ribs and vascular markings, each patient with their own pose, size and exposure. Each
of the 14 findings adds its own visual signature with a random severity, so some findings are easy
(Cardiomegaly, Effusion, Mass) and some subtle (Infiltration, Nodule, Fibrosis). Label vectors,
patient ids, views, ages and sexes come from the real NIH table (`nih_metadata`), so the label
frequencies and co-occurrences are the real ones; view, sex and age change the image as in real
films (AP magnifies the heart, breast shadows, bone contrast), i.e. realistic confounders.

`synthetic_brats` draws brain volumes (ellipsoid brain, cortex, ventricles, skull-like rim) with a
tumour (oedema, enhancing rim, necrotic / non-enhancing core) in four modalities with realistic
relative contrast, a smooth bias field and noise; labels follow the BraTS 2020/2021 convention
(0, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing) and are returned as the WT/TC/ET region
targets, one 2-D axial slice per example. `synthetic_brats_patches` renders whole cubic volumes
from the same generator and returns 3-D patches of them instead (`data/patches.py`).

Both are deterministic functions of their seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fedjax_med import streams
from fedjax_med.data import mri, nih_metadata, patches

_CHUNK = 256  # examples generated together; bounds the temporaries to a few tens of MB
# Strength of the chest X-ray findings' signatures. At 1 (faint, as on full-resolution films) a
# small ResNet on 32 px images needs thousands of steps to rise above AUROC 0.6 with 3,000 images,
# so no 20-round CPU run says anything; at 2.5 it reaches about 0.8 after 750 centralised steps
# and findings keep their relative difficulty (emphysema and pleural thickening stay hardest).
DEFAULT_CXR_SIGNAL = 2.5


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipse(x, y, cx, cy, rx, ry, soft=0.04):
    """Soft indicator of an axis-aligned ellipse (1 inside, 0 outside, `soft` edge width)."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _sigmoid((1.0 - r) / soft)


def _blob(x, y, cx, cy, radius):
    return np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / radius**2)


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Band-limited noise [n, size, size] ~N(0,1): bilinear upsampling of a cells^2 grid."""
    grid = rng.standard_normal((n, cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(np.int32), cells - 1)
    f = t - i0
    rows = grid[:, i0, :] * (1 - f)[None, :, None] + grid[:, i0 + 1, :] * f[None, :, None]
    return rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]


def _col(v: np.ndarray) -> np.ndarray:
    """Per-example parameter [n] -> broadcastable [n, 1, 1]."""
    return np.asarray(v, np.float32)[:, None, None]


# ---------------------------------------------------------------------------------------------
# Chest X-ray
# ---------------------------------------------------------------------------------------------


def sample_cxr_metadata(
    num: int, seed: int, max_images_per_patient: int = 4, table: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Draws `num` image rows of the real NIH table, whole patients at a time.

    Patients are taken in a seeded random order with at most `max_images_per_patient` of their
    images each (so a few patients with 100+ follow-ups do not dominate; 0 takes every image of a
    patient, so num=112,120 is the whole table), until `num` rows are collected.
    Returns 'label' float32 [num, 14], 'patient_id', 'view' (0 PA, 1 AP), 'age',
    'sex' (0 M, 1 F), 'follow_up' (int64 [num]); rows of one patient are contiguous.
    """
    table = nih_metadata.load_metadata_table() if table is None else table
    rng = np.random.default_rng([seed, streams.DATA_SYNTHETIC_CXR_META])
    pids = table['patient_id']
    # The table is sorted by patient id, so each patient is one contiguous run of rows.
    starts = np.flatnonzero(np.r_[True, pids[1:] != pids[:-1]])
    counts = np.diff(np.r_[starts, len(pids)])
    order = rng.permutation(len(starts))
    rows, total = [], 0
    for p in order:
        take = min(counts[p], max_images_per_patient or counts[p], num - total)
        picked = starts[p] + np.sort(rng.choice(counts[p], size=take, replace=False))
        rows.append(picked)
        total += take
        if total >= num:
            break
    if total < num:
        raise ValueError(
            f'Asked for {num} synthetic CXR rows but the table only yields {total} '
            f'with max_images_per_patient={max_images_per_patient}.'
        )
    idx = np.concatenate(rows)
    return {
        'label': table['labels'][idx].astype(np.float32),
        'patient_id': table['patient_id'][idx],
        'view': table['view'][idx],
        'age': table['age'][idx],
        'sex': table['sex'][idx],
        'follow_up': table['follow_up'][idx],
    }


# Long on purpose: one radiograph is drawn layer by layer (anatomy, then each finding's
# signature, then acquisition), every layer on the same arrays and random stream; splitting it
# would change nothing but the reading order.
def _cxr_chunk(
    rng: np.random.Generator,
    labels: np.ndarray,
    view: np.ndarray,
    age: np.ndarray,
    sex: np.ndarray,
    res: int,
    gain: float,
) -> np.ndarray:
    """Renders len(labels) radiographs [n, res, res] with values in [0, 1].

    `gain` scales every finding's signature (its opacity or lucency, and its size change for
    cardiomegaly, emphysema and atelectasis); 1 is subtle, about as faint as at full resolution.
    """
    n = len(labels)
    u = lambda lo, hi: _col(rng.uniform(lo, hi, n))
    side = lambda: _col(rng.choice([-1.0, 1.0], n))
    # Severity per finding: 0 when absent, otherwise how visible this instance is.
    sev = (labels * rng.uniform(0.55, 1.25, labels.shape)).astype(np.float32)
    s = [_col(sev[:, k]) for k in range(labels.shape[1])]
    ap, female = _col(view), _col(sex)
    old = _col(np.clip((age - 20) / 70.0, 0.0, 1.0))

    # Patient pose and habitus: a per-example similarity transform of the coordinate grid.
    g = np.linspace(-1.0, 1.0, res, dtype=np.float32)
    y0, x0 = np.meshgrid(g, g, indexing='ij')
    theta, scale = u(-0.06, 0.06), u(0.9, 1.08)
    dx, dy = u(-0.06, 0.06), u(-0.06, 0.06)
    x = (np.cos(theta) * x0[None] + np.sin(theta) * y0[None]) / scale + dx
    y = (-np.sin(theta) * x0[None] + np.cos(theta) * y0[None]) / scale + dy

    # Lungs: emphysema hyperinflates, AP films (supine, poor inspiration) look shorter.
    # Atelectasis: volume loss lifts the hemidiaphragm on its side.
    inflate = 1.0 + 0.07 * gain * s[10] - 0.06 * ap
    lung_rx, lung_ry = 0.29 * (1 + 0.06 * gain * s[10]), 0.56 * inflate
    atel_side = side()
    loss = 1.0 - np.minimum(0.1 * gain, 0.3) * s[0].clip(0, 1)
    lung_r = _ellipse(x, y, -0.37, -0.04, lung_rx, lung_ry * np.where(atel_side < 0, loss, 1.0))
    lung_l = _ellipse(
        x, y, 0.37, -0.04, lung_rx * 0.95, lung_ry * np.where(atel_side > 0, loss, 1.0)
    )
    lungs = np.maximum(lung_r, lung_l)

    # Heart: AP magnifies it; cardiomegaly enlarges it (cardiothoracic ratio up).
    heart_rx = 0.26 * (1 + 0.1 * ap + 0.2 * gain * s[1]) * u(0.88, 1.12)
    heart = _ellipse(x, y, 0.1, 0.3, heart_rx, 0.23 * (1 + 0.12 * gain * s[1]), soft=0.05)

    body = _ellipse(x, y, 0.0, 0.12, 0.9, 1.05, soft=0.08)
    spine = _ellipse(x, y, 0.0, 0.0, 0.07, 1.2, soft=0.1)
    img = 0.12 + 0.33 * body + 0.08 * spine * body

    # Pneumothorax: the lung collapses away from the chest wall at the apex -> a lucent band
    # without markings, bounded by a thin visceral pleural line.
    ptx_side = side()
    collapse = 1.0 - 0.2 * s[7]
    lung_ptx_side = np.where(ptx_side < 0, lung_r, lung_l)
    shrunk = _ellipse(
        x,
        y,
        ptx_side * 0.37 * (1 - 0.1 * s[7]),
        0.02 * s[7],
        lung_rx * collapse,
        lung_ry * collapse,
        soft=0.02,
    )
    ptx_band = lung_ptx_side * (1 - shrunk) * (s[7] > 0) * _sigmoid((0.25 - y) / 0.1)

    # Vascular markings fade towards the periphery; emphysema and pneumothorax remove them.
    markings = _smooth_noise(rng, n, res, 14)
    hilar = np.exp(-(np.minimum(np.abs(x - 0.2), np.abs(x + 0.2)) ** 2 + (y - 0.05) ** 2) / 0.2)
    markings = 0.035 * markings * hilar * (1 - 0.4 * s[10].clip(0, 1)) * (1 - ptx_band)
    lucency = (0.25 + 0.03 * gain * s[10]) * lungs * (1 - heart)
    img = img - lucency + markings * lungs + 0.06 * heart - 0.05 * gain * ptx_band
    img = img + 0.09 * gain * s[7].clip(0, 1) * lung_ptx_side * np.exp(
        -(((1 - shrunk) * shrunk * 4 - 1) ** 2) / 0.02
    ) * _sigmoid((0.25 - y) / 0.1)

    # Posterior ribs: curved bands over the lungs; bone contrast falls with age.
    rib_phase = 7.0 * (y + 0.35 * x**2) + u(0, 1)
    ribs = np.clip(np.sin(2 * np.pi * rib_phase), 0, 1) ** 2
    img = img + (0.07 - 0.03 * old) * ribs * lungs
    # AP: scapulae project over the upper lungs. Female: breast shadows over the bases.
    scap = _blob(x, y, -0.62, -0.35, 0.14) + _blob(x, y, 0.62, -0.35, 0.14)
    breast = _blob(x, y, -0.42, 0.5, 0.17) + _blob(x, y, 0.42, 0.5, 0.17)
    img = img + 0.07 * ap * scap + 0.06 * female * breast

    def in_lung(side_sign, lo_y=-0.35, hi_y=0.38):
        return side_sign * (0.37 + u(-0.12, 0.12)), u(lo_y, hi_y)

    # Atelectasis: plate-like basal opacity (on the side that lost volume).
    cx, cy = in_lung(atel_side, 0.1, 0.3)
    img = img + 0.15 * gain * s[0] * _ellipse(x, y, cx, cy, 0.2, 0.05, soft=0.08)
    # Effusion: basal opacity with a meniscus rising laterally (blunted costophrenic angle).
    sd = side()
    lung_side = np.where(sd < 0, lung_r, lung_l)
    level = 0.5 - 0.22 * s[2] - 0.35 * np.abs(x - sd * 0.37) ** 2
    img = img + 0.15 * gain * s[2].clip(0, 1) * lung_side * _sigmoid((y - level) / 0.03)
    # Infiltration: a few faint, fuzzy patches anywhere in the lungs.
    patches = sum(_blob(x, y, *in_lung(side()), u(0.06, 0.1)) for _ in range(3))
    img = img + 0.06 * gain * s[3] * patches * lungs
    # Mass: large round opacity; Nodule: small round opacity.
    img = img + 0.15 * gain * s[4].clip(0, 1) * _ellipse(
        x, y, *in_lung(side()), *(u(0.09, 0.14),) * 2, soft=0.08
    )
    img = img + 0.2 * gain * s[5].clip(0, 1) * _ellipse(
        x, y, *in_lung(side()), *(u(0.045, 0.065),) * 2, soft=0.1
    )
    # Pneumonia: patchy, textured lobar opacity in the mid/lower zones.
    texture = np.clip(_smooth_noise(rng, n, res, 10) + 0.6, 0, 1)
    img = img + 0.14 * gain * s[6] * texture * _blob(
        x, y, *in_lung(side(), 0.0, 0.35), u(0.13, 0.18)
    )
    # Consolidation: dense homogeneous opacity with sharp borders.
    r_cons = u(0.1, 0.15)
    img = (
        img
        + 0.14
        * gain
        * s[8].clip(0, 1)
        * _ellipse(x, y, *in_lung(side()), r_cons, r_cons * 0.8, soft=0.03)
        * lungs
    )
    # Edema: bilateral perihilar (bat-wing) haze.
    img = img + 0.06 * gain * s[9] * lungs * (
        _blob(x, y, -0.22, 0.05, 0.2) + _blob(x, y, 0.22, 0.05, 0.2)
    )
    # Fibrosis: reticular lines in the lower, peripheral lungs.
    warp = 0.15 * _smooth_noise(rng, n, res, 6)
    net = (np.abs(np.sin(22 * (x + warp))) < 0.25) | (np.abs(np.sin(22 * (y - warp))) < 0.25)
    periph = _sigmoid((np.abs(x) - 0.3) / 0.08) * _sigmoid((y + 0.05) / 0.1)
    img = img + 0.07 * gain * s[11] * net * periph * lungs
    # Pleural thickening: a bright rim along the upper/lateral pleura.
    rim = lungs - np.maximum(
        _ellipse(x, y, -0.37, -0.04, lung_rx * 0.9, lung_ry * 0.93),
        _ellipse(x, y, 0.37, -0.04, lung_rx * 0.86, lung_ry * 0.93),
    )
    img = img + 0.16 * gain * s[12] * np.clip(rim, 0, 1) * _sigmoid((0.2 - y) / 0.15)
    # Hernia: a gas bubble with a bright wall behind the heart.
    bubble = _ellipse(x, y, 0.06, 0.42, 0.09, 0.075, soft=0.05)
    wall = _ellipse(x, y, 0.06, 0.42, 0.11, 0.095, soft=0.05) - bubble
    img = img + gain * s[13].clip(0, 1) * (0.12 * wall - 0.14 * bubble)

    # Exposure: per-film brightness, contrast and quantum noise (more on portable AP films).
    img = u(0.85, 1.15) * (img - 0.3) + 0.3 + u(-0.05, 0.05)
    img = img + (0.02 + 0.01 * ap) * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def synthetic_cxr(
    num: int,
    resolution: int,
    seed: int,
    metadata_rows: dict[str, np.ndarray] | None = None,
    signal: float = DEFAULT_CXR_SIGNAL,
) -> dict[str, np.ndarray]:
    """Synthetic chest radiographs with real NIH label vectors and demographics.

    Args:
      num: number of images.
      resolution: image side in pixels.
      seed: everything (metadata draw, anatomy, findings, noise) is a function of it.
      metadata_rows: optional rows to render, as returned by `sample_cxr_metadata` (at least
        'label', 'patient_id', 'view', 'age', 'sex'; length `num`); drawn from the shipped NIH
        table when None.
      signal: strength of every finding's visual signature (1 = subtle; the default makes the
        14 findings learnable by a small CNN at 32 px in a few hundred steps, see
        DEFAULT_CXR_SIGNAL).

    Returns:
      'image' float32 [num, resolution, resolution, 1] in [0, 1], 'label' float32 [num, 14]
      (`nih_metadata.CXR_LABELS` order), 'patient_id', 'view' (0 PA, 1 AP), 'age', 'sex' (0 M, 1 F)
      as int64 [num], plus any other columns of `metadata_rows`.
    """
    rows = sample_cxr_metadata(num, seed) if metadata_rows is None else dict(metadata_rows)
    if len(rows['label']) != num:
        raise ValueError(f'metadata_rows has {len(rows["label"])} rows, expected num={num}.')
    rng = np.random.default_rng([seed, streams.DATA_SYNTHETIC_CXR])
    images = np.empty((num, resolution, resolution, 1), np.float32)
    for start in range(0, num, _CHUNK):
        sl = slice(start, min(start + _CHUNK, num))
        images[sl, ..., 0] = _cxr_chunk(
            rng,
            np.asarray(rows['label'][sl], np.float32),
            np.asarray(rows['view'][sl]),
            np.asarray(rows['age'][sl], np.float32),
            np.asarray(rows['sex'][sl]),
            resolution,
            float(signal),
        )
    out = {k: np.asarray(v) for k, v in rows.items()}
    out['label'] = out['label'].astype(np.float32)
    out['image'] = images
    return out


# ---------------------------------------------------------------------------------------------
# BraTS
# ---------------------------------------------------------------------------------------------

# Mean intensity of each tissue in (FLAIR, T1, T1ce, T2), roughly as in skull-stripped BraTS:
# oedema bright on FLAIR/T2, enhancing rim bright on T1ce, necrosis dark on T1/T1ce, CSF
# suppressed on FLAIR and bright on T2.
_TISSUE_INTENSITY = {
    'rim': (0.35, 0.9, 0.9, 0.3),
    'gm': (0.75, 0.65, 0.68, 0.75),
    'wm': (0.6, 0.9, 0.92, 0.5),
    'csf': (0.12, 0.2, 0.22, 1.3),
    'oedema': (1.25, 0.55, 0.58, 1.2),
    'enhancing': (0.95, 0.6, 1.5, 0.9),
    'necrosis': (0.6, 0.3, 0.25, 1.35),
    'nonenhancing': (0.95, 0.5, 0.55, 1.0),
}


# Long on purpose: anatomy, tumour regions and the four modalities are drawn in order from one
# random stream (see _cxr_chunk).
def _brats_chunk(rng: np.random.Generator, n: int, res: int, depth: int):
    """Renders n cases: images [n, depth, res, res, 4] z-scored in the head, labels {0,1,2,4}."""
    u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)[:, None, None, None]
    gz = np.linspace(-0.8, 0.8, depth, dtype=np.float32)
    g = np.linspace(-1.0, 1.0, res, dtype=np.float32)
    z, y, x = (a[None] for a in np.meshgrid(gz, g, g, indexing='ij'))
    cx, cy, sc = u(-0.05, 0.05), u(-0.05, 0.05), u(0.85, 1.0)
    xb, yb = (x - cx) / sc, (y - cy) / sc
    r = np.sqrt((xb / 0.72) ** 2 + (yb / 0.88) ** 2 + (z / 0.95) ** 2)
    # Gyri: the cortex thickness wobbles with a smooth in-plane noise field.
    gyri = 0.05 * _smooth_noise(rng, n, res, 12)[:, None]
    head = r < 1.07
    brain = r < 1.0
    cortex = brain & (r > 0.84 + gyri)
    vent = (
        (np.abs(np.abs(xb) - 0.1) / 0.07) ** 2 + ((yb + 0.05) / 0.28) ** 2 + (z / 0.35) ** 2
    ) < 1.0

    # Tumour: oedema with an irregular border around a core; HGG-like cases (75%) have an
    # enhancing rim around necrosis, the others a non-enhancing core only.
    ang = rng.uniform(0, 2 * np.pi, n)
    rad = rng.uniform(0.0, 0.45, n)
    tx = (np.cos(ang) * rad * 0.72).astype(np.float32)[:, None, None, None] * sc + cx
    ty = (np.sin(ang) * rad * 0.88).astype(np.float32)[:, None, None, None] * sc + cy
    tz = u(-0.35, 0.35)
    r_ed, core_frac, necro_frac = u(0.22, 0.45), u(0.5, 0.8), u(0.3, 0.65)
    hgg = rng.uniform(size=n) < 0.75
    wobble = 1.0 + 0.18 * _smooth_noise(rng, n, res, 6)[:, None]
    d = np.sqrt((x - tx) ** 2 + (y - ty) ** 2 + ((z - tz) * 1.2) ** 2) / r_ed * wobble
    oedema = brain & (d < 1.0)
    core = brain & (d < core_frac)
    necrotic = core & (d < core_frac * necro_frac)
    seg = np.zeros(d.shape, np.uint8)
    seg[oedema] = 2
    hgg_b = hgg[:, None, None, None]
    seg[core & hgg_b] = 4
    seg[necrotic & hgg_b] = 1
    seg[core & ~hgg_b] = 1

    # Per-case contrast: every tissue's intensity jitters by up to 15% per modality.
    names = list(_TISSUE_INTENSITY)
    table = np.asarray([_TISSUE_INTENSITY[k] for k in names], np.float32)
    table = table[None] * rng.uniform(0.85, 1.15, (n, *table.shape)).astype(np.float32)
    look = lambda name: table[:, names.index(name)][:, None, None, None, :]  # [n,1,1,1,4]
    normal = np.where(cortex[..., None], look('gm'), look('wm'))
    normal = np.where((vent & brain)[..., None], look('csf'), normal)
    normal = np.where((head & ~brain)[..., None], look('rim'), normal)
    normal = np.where(head[..., None], normal, 0.0)
    # Tumour intensities blend in over a soft border (infiltration, partial volume), so the
    # label boundary is not an intensity edge; oedema and enhancement are patchy.
    soft = lambda edge, width: _sigmoid((edge - d) / width)[..., None]
    w_oedema, w_core = soft(1.0, 0.12), soft(core_frac, 0.06)
    w_necro = soft(core_frac * necro_frac, 0.06)
    core_look = np.where(hgg_b[..., None], look('enhancing'), look('nonenhancing'))
    inner = np.where(hgg_b[..., None], look('necrosis'), look('nonenhancing'))
    patchy = (1.0 + 0.35 * _smooth_noise(rng, n, res, 8))[:, None, :, :, None]
    tumour = look('oedema') * (1 - w_core) + w_core * (core_look * (1 - w_necro) + w_necro * inner)
    w = w_oedema * brain[..., None]
    img = normal + w * (tumour - normal) * np.clip(patchy, 0.3, 1.5)
    # Unlabelled mimics: white-matter hyperintensities (FLAIR/T2) and enhancing vessels (T1ce).
    for _ in range(3):
        spot = (
            np.exp(
                -(
                    ((x - u(-0.5, 0.5)) ** 2 + (y - u(-0.6, 0.6)) ** 2) / 0.004
                    + (z - u(-0.6, 0.6)) ** 2 / 0.03
                )
            )[..., None]
            * brain[..., None]
        )
        img = img + spot * np.asarray([0.45, 0.0, 0.0, 0.35], np.float32) * u(0.0, 1.0)[..., None]
        vessel = (
            np.exp(-(((x - u(-0.5, 0.5)) ** 2) / 0.002 + ((y - u(-0.6, 0.6)) ** 2) / 0.02))[
                ..., None
            ]
            * brain[..., None]
        )
        img = img + vessel * np.asarray([0.0, 0.0, 0.5, 0.0], np.float32) * u(0.0, 1.0)[..., None]

    texture = 0.1 * _smooth_noise(rng, n, res, 20)[:, None, :, :, None]
    bias = (
        1.0
        + u(-0.15, 0.15) * x
        + u(-0.15, 0.15) * y
        + u(-0.1, 0.1) * z
        + u(-0.1, 0.1) * (x * x - 0.3)
    )[..., None]
    img = (img + texture * head[..., None]) * bias
    img = img + 0.1 * rng.standard_normal(img.shape).astype(np.float32) * head[..., None]
    img = mri.zscore_in_mask(img, head)
    return img.astype(np.float32), seg, hgg


def synthetic_brats(
    num_cases: int, resolution: int, slices_per_case: int, seed: int
) -> dict[str, np.ndarray]:
    """Synthetic multi-modal brain-tumour MRI, as 2-D axial slices.

    Args:
      num_cases: number of volumes (patients).
      resolution: in-plane side in pixels.
      slices_per_case: axial slices per volume, evenly spaced through the brain; the tumour covers
        only some of them, so some slices have no tumour (as in real BraTS slices).
      seed: everything is a function of it.

    Returns:
      'image' float32 [n, R, R, 4] (FLAIR, T1, T1ce, T2, z-scored inside the head, 0 outside),
      'label' float32 [n, R, R, 3] (WT, TC, ET regions), 'patient_id' / 'case_id' (int64 case
      index), 'slice_index', 'has_tumor', 'grade' (1 HGG-like, 0 LGG-like), with
      n = num_cases * slices_per_case.
    """
    rng = np.random.default_rng([seed, streams.DATA_SYNTHETIC_BRATS])
    n = num_cases * slices_per_case
    images = np.empty((n, resolution, resolution, 4), np.float32)
    labels = np.empty((n, resolution, resolution, 3), np.float32)
    grade = np.empty(num_cases, np.int64)
    per_chunk = max(1, _CHUNK // max(1, slices_per_case) // 4)
    for start in range(0, num_cases, per_chunk):
        m = min(per_chunk, num_cases - start)
        img, seg, hgg = _brats_chunk(rng, m, resolution, slices_per_case)
        sl = slice(start * slices_per_case, (start + m) * slices_per_case)
        images[sl] = img.reshape(-1, resolution, resolution, 4)
        labels[sl] = mri.seg_to_regions(seg, 'brats').reshape(-1, resolution, resolution, 3)
        grade[start : start + m] = hgg
    case = np.repeat(np.arange(num_cases, dtype=np.int64), slices_per_case)
    return {
        'image': images,
        'label': labels,
        'patient_id': case,
        'case_id': case,
        'slice_index': np.tile(np.arange(slices_per_case, dtype=np.int64), num_cases),
        'has_tumor': (labels[..., 0].reshape(n, -1).max(-1) > 0).astype(np.int64),
        'grade': np.repeat(grade, slices_per_case),
    }


def synthetic_brats_volumes(num_cases: int, resolution: int, seed: int) -> Iterator[dict]:
    """Synthetic BraTS cases as whole volumes, one dict per case, generated a few at a time.

    Each volume is a cube of resolution^3 voxels [Z, H, W] (axial planes as in `synthetic_brats`,
    spanning the same +-0.8 of the head axially), rendered by the same generator.

    Yields:
      'image' float32 [R, R, R, 4] (FLAIR, T1, T1ce, T2, z-scored inside the head, 0 outside),
      'label' float32 [R, R, R, 3] (WT, TC, ET), 'patient_id' and 'case_id' (the int case index)
      and 'grade' (1 HGG-like, 0 LGG-like).
    """
    rng = np.random.default_rng([seed, streams.DATA_SYNTHETIC_BRATS])
    # About 2^20 voxels per chunk keeps the generator's temporaries to a few hundred MB.
    per_chunk = max(1, 2**20 // resolution**3)
    for start in range(0, num_cases, per_chunk):
        m = min(per_chunk, num_cases - start)
        img, seg, hgg = _brats_chunk(rng, m, resolution, resolution)
        regions = mri.seg_to_regions(seg, 'brats')
        for i in range(m):
            yield {
                'image': img[i],
                'label': regions[i],
                'patient_id': start + i,
                'case_id': start + i,
                'grade': int(hgg[i]),
            }


def synthetic_brats_patches(
    num_cases: int,
    resolution: int,
    patch_size: int,
    patches_per_case: int,
    tumour_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Synthetic BraTS as 3-D patches: `patches_per_case` patches of each volume of
    `synthetic_brats_volumes`, sampled by `patches.patches_from_cases` (foreground oversampling).

    Returns 'image' float32 [n, P, P, P, 4], 'label' float32 [n, P, P, P, 3] (WT, TC, ET),
    'patient_id' / 'case_id' (int64 case index), 'grade', 'patch_index', 'patch_origin' [n, 3],
    'volume_shape' [n, 3], 'centre' [n, 3], 'tumour_centred' and 'has_tumor', with
    n = num_cases * patches_per_case; everything is a function of `seed`.
    """
    return patches.patches_from_cases(
        synthetic_brats_volumes(num_cases, resolution, seed),
        patch_size=patch_size,
        patches_per_case=patches_per_case,
        tumour_fraction=tumour_fraction,
        seed=seed,
    )
