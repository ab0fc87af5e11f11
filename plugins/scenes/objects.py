"""Object kinds: how each is sampled (size, paints) and drawn as parts on a canvas.

An object instance stands on its base point (``y``, ``x``; normalized, y grows
downward) at scale ``s`` (1 = near the middle of the ground). ``sample_object``
draws every random choice up front, so drawing is a pure function of the instance
and the canvas size. Each drawer paints the object's parts in order; a part's
pixels carry the object label too, so parts always lie inside their object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .canvas import Canvas, Paint, bounds, ellipse, polygon, solid, textured
from .concepts import object_id, part_id
from .rand import Rand


@dataclass
class Instance:
    """One object to draw: kind, base point, scale and its sampled paints/shape knobs."""

    kind: str
    y: float
    x: float
    s: float
    paints: dict[str, Paint] = field(default_factory=dict)
    knobs: dict[str, float] = field(default_factory=dict)


def _choice(rng: Rand, options: tuple[str, ...], p: tuple[float, ...] | None = None) -> str:
    return rng.choice(options if p is None else dict(zip(options, p, strict=True)))


def _plain_or(
    rng: Rand,
    terms: tuple[str, ...],
    material: str,
    pairs: tuple[tuple[str, str], ...],
    p_material: float,
    period: float,
) -> Paint:
    """A plain paint of one of ``terms`` or, with probability ``p_material``, a texture."""
    if rng.random() < p_material:
        a, b = pairs[int(rng.integers(len(pairs)))]
        return textured(rng, material, a, b, period)
    return solid(rng, _choice(rng, terms))


# --- samplers: every random choice for an instance -----------------------------------


def _sample_house(rng: Rand, inst: Instance) -> None:
    s = inst.s
    inst.knobs.update(
        w=0.26 * s * rng.uniform(0.8, 1.25),
        h=0.2 * s * rng.uniform(0.8, 1.2),
        rh=0.11 * s * rng.uniform(0.7, 1.3),
        door=rng.uniform(-0.25, 0.25),
        windows=float(rng.integers(1, 3)),
    )
    kind = rng.random()
    if kind < 0.35:
        brick = (("red", "grey"), ("brown", "white"), ("orange", "grey"), ("red", "white"))
        wall = textured(rng, "brick", *brick[int(rng.integers(4))], 0.02 * s + 0.008)
    elif kind < 0.55:
        wall = textured(rng, "wood", "brown", "brown", 0.03 * s + 0.01)
    else:
        wall = solid(rng, _choice(rng, ("white", "yellow", "pink", "blue", "grey", "green")))
    roof = _plain_or(
        rng,
        ("red", "brown", "grey", "black"),
        "stripes",
        (("red", "black"), ("grey", "black")),
        0.3,
        0.02 * s + 0.008,
    )
    roof = roof if roof.color != wall.color else solid(rng, "black")
    door = _plain_or(
        rng, ("brown", "red", "blue", "green"), "wood", (("brown", "brown"),), 0.3, 0.02
    )
    door = door if door.color != wall.color else solid(rng, "black")
    window = solid(rng, _choice(rng, ("blue", "white", "yellow", "black")))
    window = window if window.color != wall.color else solid(rng, "black")
    inst.paints.update(wall=wall, roof=roof, door=door, window=window)


def _sample_tree(rng: Rand, inst: Instance) -> None:
    s = inst.s
    inst.knobs.update(
        tw=0.035 * s * rng.uniform(0.8, 1.2),
        th=0.12 * s * rng.uniform(0.7, 1.3),
        ry=0.13 * s * rng.uniform(0.8, 1.3),
        rx=0.09 * s * rng.uniform(0.8, 1.3),
        pine=float(rng.random() < 0.3),
    )
    crown = _choice(rng, ("green", "orange", "yellow", "red"), p=(0.82, 0.08, 0.05, 0.05))
    trunk = _plain_or(rng, ("brown", "black"), "wood", (("brown", "brown"),), 0.3, 0.015)
    inst.paints.update(crown=solid(rng, crown), trunk=trunk)


def _sample_car(rng: Rand, inst: Instance) -> None:
    s = inst.s
    inst.knobs.update(length=0.28 * s * rng.uniform(0.85, 1.2), facing=rng.choice((-1.0, 1.0)))
    terms = ("red", "blue", "white", "black", "grey", "yellow", "green", "orange")
    body = _plain_or(rng, terms, "stripes", (("red", "white"), ("blue", "white")), 0.12, 0.02)
    window = solid(rng, _choice(rng, ("blue", "grey", "black")))
    window = window if window.color != body.color else solid(rng, "white")
    wheel = solid(rng, "black" if body.color != "black" else "grey")
    inst.paints.update(body=body, window=window, wheel=wheel)


def _sample_person(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(h=0.2 * inst.s * rng.uniform(0.85, 1.15))
    terms = ("red", "blue", "green", "yellow", "white", "purple", "orange", "pink", "grey")
    shirt = _plain_or(
        rng,
        terms,
        _choice(rng, ("stripes", "dots")),
        (("red", "white"), ("blue", "white"), ("green", "yellow"), ("purple", "white")),
        0.3,
        0.012,
    )
    legs = solid(rng, _choice(rng, ("blue", "black", "grey", "brown")))
    head = solid(rng, _choice(rng, ("pink", "orange", "brown")))
    inst.paints.update(body=shirt, leg=legs, head=head)


def _sample_cow(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.16 * inst.s * rng.uniform(0.85, 1.2), facing=rng.choice((-1.0, 1.0)))
    if rng.random() < 0.45:
        body = textured(rng, "dots", "white", "black", 0.035 * inst.s + 0.01)
        rest = solid(rng, "white")
    else:
        term = _choice(rng, ("brown", "black", "white"))
        body, rest = solid(rng, term), solid(rng, term)
    inst.paints.update(body=body, head=rest, leg=rest)


def _sample_boat(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.22 * inst.s * rng.uniform(0.8, 1.2), sail=rng.uniform(0.8, 1.3))
    hull = _plain_or(
        rng, ("white", "red", "blue", "brown"), "wood", (("brown", "brown"),), 0.25, 0.015
    )
    sail = _plain_or(
        rng, ("white", "red", "yellow"), "stripes", (("red", "white"), ("blue", "white")), 0.3, 0.02
    )
    inst.paints.update(hull=hull, sail=sail)


def _sample_umbrella(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.2 * inst.s * rng.uniform(0.8, 1.2))
    pairs = (("red", "white"), ("blue", "white"), ("yellow", "orange"), ("green", "white"))
    canopy = _plain_or(
        rng, ("red", "blue", "yellow", "green", "pink"), "stripes", pairs, 0.6, 0.025
    )
    inst.paints.update(canopy=canopy, pole=solid(rng, _choice(rng, ("white", "grey", "brown"))))


def _sample_fence(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(
        w=rng.uniform(0.3, 0.9),
        h=0.07 * inst.s * rng.uniform(0.8, 1.2),
        period=0.03 * inst.s + 0.01,
    )
    inst.paints.update(
        fence=_plain_or(rng, ("white", "brown", "grey"), "wood", (("brown", "brown"),), 0.4, 0.012)
    )


def _sample_table(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.3 * inst.s * rng.uniform(0.8, 1.2), h=0.15 * inst.s)
    paint = _plain_or(
        rng, ("white", "brown", "black", "grey"), "wood", (("brown", "brown"),), 0.5, 0.015
    )
    inst.paints.update(top=paint, leg=solid(rng, paint.color))


def _sample_chair(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.11 * inst.s * rng.uniform(0.85, 1.2), facing=rng.choice((-1.0, 1.0)))
    paint = _plain_or(
        rng, ("brown", "red", "black", "white", "blue"), "wood", (("brown", "brown"),), 0.4, 0.012
    )
    inst.paints.update(seat=paint, back=paint, leg=solid(rng, paint.color))


def _sample_cabinet(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(
        w=0.3 * inst.s * rng.uniform(0.8, 1.3), h=0.2 * inst.s * rng.uniform(0.9, 1.2)
    )
    frame = solid(rng, _choice(rng, ("white", "brown", "grey", "blue", "green", "yellow")))
    front = _plain_or(
        rng, ("white", "brown", "grey", "red", "blue"), "wood", (("brown", "brown"),), 0.35, 0.015
    )
    front = front if front.color != frame.color else solid(rng, "black")
    inst.paints.update(frame=frame, door=front, drawer=front)


def _sample_cloud(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=0.18 * rng.uniform(0.6, 1.4), h=0.05 * rng.uniform(0.7, 1.3))
    inst.paints.update(cloud=solid(rng, _choice(rng, ("white", "grey"), p=(0.8, 0.2))))


def _sample_sun(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(r=0.05 * rng.uniform(0.7, 1.4))
    inst.paints.update(sun=solid(rng, _choice(rng, ("yellow", "orange", "white"))))


def _sample_mountain(rng: Rand, inst: Instance) -> None:
    inst.knobs.update(w=rng.uniform(0.3, 0.7), h=rng.uniform(0.12, 0.3), snow=rng.uniform(0, 0.4))
    inst.paints.update(
        mountain=solid(rng, _choice(rng, ("grey", "brown", "purple", "green"))),
        snow=solid(rng, "white"),
    )


# --- drawers: geometry only, from the sampled knobs ----------------------------------


def _draw_house(c: Canvas, t: Instance) -> None:
    k, o = t.knobs, object_id("house")
    w, h, rh = k["w"], k["h"], k["rh"]
    top = t.y - h
    c.paint((top, t.x - w / 2, t.y, t.x + w / 2), t.paints["wall"], o, part_id("wall"))
    roof = [(top, t.x - 0.6 * w), (top, t.x + 0.6 * w), (top - rh, t.x)]
    c.paint(bounds(roof), t.paints["roof"], o, part_id("roof"), polygon(roof))
    dx = t.x + k["door"] * w
    c.paint((t.y - 0.55 * h, dx - 0.1 * w, t.y, dx + 0.1 * w), t.paints["door"], o, part_id("door"))
    side = 1.0 if k["door"] < 0 else -1.0
    spots = [t.x + side * 0.25 * w] + ([t.x - side * 0.25 * w] if k["windows"] > 1 else [])
    for wx in spots:
        if abs(wx - dx) > 0.2 * w:
            box = (top + 0.2 * h, wx - 0.1 * w, top + 0.45 * h, wx + 0.1 * w)
            c.paint(box, t.paints["window"], o, part_id("window"))


def _draw_tree(c: Canvas, t: Instance) -> None:
    k, o = t.knobs, object_id("tree")
    tw, th, ry, rx = k["tw"], k["th"], k["ry"], k["rx"]
    c.paint(
        (t.y - th - 0.2 * ry, t.x - tw / 2, t.y, t.x + tw / 2),
        t.paints["trunk"],
        o,
        part_id("trunk"),
    )
    if k["pine"]:
        crown = [(t.y - th, t.x - rx), (t.y - th, t.x + rx), (t.y - th - 2.2 * ry, t.x)]
        c.paint(bounds(crown), t.paints["crown"], o, part_id("crown"), polygon(crown))
    else:
        cy = t.y - th - 0.8 * ry
        c.paint(
            (cy - ry, t.x - rx, cy + ry, t.x + rx),
            t.paints["crown"],
            o,
            part_id("crown"),
            ellipse(cy, t.x, ry, rx),
        )


def _draw_car(c: Canvas, t: Instance) -> None:
    k, o = t.knobs, object_id("car")
    L, f = k["length"], k["facing"]
    r = 0.12 * L
    bottom, top = t.y - 0.6 * r, t.y - 0.6 * r - 0.26 * L
    c.paint((top, t.x - L / 2, bottom, t.x + L / 2), t.paints["body"], o, part_id("body"))
    ch = 0.2 * L
    back, front = t.x - f * 0.32 * L, t.x + f * 0.18 * L
    cabin = [
        (top, back - f * 0.05 * L),
        (top, front + f * 0.1 * L),
        (top - ch, front),
        (top - ch, back),
    ]
    c.paint(bounds(cabin), t.paints["body"], o, part_id("body"), polygon(cabin))
    mid = (back + front) / 2
    for a, b in ((back, mid), (mid, front)):
        lo, hi = min(a, b), max(a, b)
        c.paint(
            (top - 0.8 * ch, lo + 0.03 * L, top - 0.1 * ch, hi - 0.03 * L),
            t.paints["window"],
            o,
            part_id("window"),
        )
    for wx in (t.x - 0.3 * L, t.x + 0.3 * L):
        c.paint(
            (t.y - 2 * r, wx - r, t.y, wx + r),
            t.paints["wheel"],
            o,
            part_id("wheel"),
            ellipse(t.y - r, wx, r, r),
        )


def _draw_person(c: Canvas, t: Instance) -> None:
    h, o = t.knobs["h"], object_id("person")
    for lx in (t.x - 0.07 * h, t.x + 0.07 * h):
        c.paint(
            (t.y - 0.45 * h, lx - 0.045 * h, t.y, lx + 0.045 * h),
            t.paints["leg"],
            o,
            part_id("leg"),
        )
    c.paint(
        (t.y - 0.8 * h, t.x - 0.14 * h, t.y - 0.43 * h, t.x + 0.14 * h),
        t.paints["body"],
        o,
        part_id("body"),
    )
    r, cy = 0.1 * h, t.y - 0.9 * h
    c.paint(
        (cy - r, t.x - r, cy + r, t.x + r),
        t.paints["head"],
        o,
        part_id("head"),
        ellipse(cy, t.x, r, r),
    )


def _draw_cow(c: Canvas, t: Instance) -> None:
    w, f, o = t.knobs["w"], t.knobs["facing"], object_id("cow")
    ry, rx = 0.28 * w, 0.5 * w
    cy = t.y - 0.45 * w - ry
    for lx in (t.x - 0.33 * w, t.x - 0.2 * w, t.x + 0.2 * w, t.x + 0.33 * w):
        c.paint((cy, lx - 0.035 * w, t.y, lx + 0.035 * w), t.paints["leg"], o, part_id("leg"))
    c.paint(
        (cy - ry, t.x - rx, cy + ry, t.x + rx),
        t.paints["body"],
        o,
        part_id("body"),
        ellipse(cy, t.x, ry, rx),
    )
    hy, hx, hr = cy - 0.7 * ry, t.x + f * 0.55 * w, 0.16 * w
    c.paint(
        (hy - hr, hx - hr, hy + hr, hx + hr),
        t.paints["head"],
        o,
        part_id("head"),
        ellipse(hy, hx, hr, 0.9 * hr),
    )


def _draw_boat(c: Canvas, t: Instance) -> None:
    w, o = t.knobs["w"], object_id("boat")
    h = 0.22 * w
    hull = [
        (t.y - h, t.x - w / 2),
        (t.y - h, t.x + w / 2),
        (t.y, t.x + 0.35 * w),
        (t.y, t.x - 0.35 * w),
    ]
    sh = 0.7 * w * t.knobs["sail"]
    sail = [(t.y - h, t.x - 0.3 * w), (t.y - h, t.x + 0.25 * w), (t.y - h - sh, t.x)]
    c.paint(bounds(sail), t.paints["sail"], o, part_id("sail"), polygon(sail))
    c.paint(bounds(hull), t.paints["hull"], o, part_id("hull"), polygon(hull))


def _draw_umbrella(c: Canvas, t: Instance) -> None:
    w, o = t.knobs["w"], object_id("umbrella")
    top = t.y - 0.9 * w
    c.paint((top, t.x - 0.03 * w, t.y, t.x + 0.03 * w), t.paints["pole"], o, part_id("pole"))
    ry = 0.35 * w
    c.paint(
        (top - ry, t.x - w / 2, top, t.x + w / 2),
        t.paints["canopy"],
        o,
        part_id("canopy"),
        ellipse(top, t.x, ry, w / 2),
    )


def _draw_fence(c: Canvas, t: Instance) -> None:
    k = t.knobs
    h, p = k["h"], k["period"]
    top = t.y - h

    def shape(y, x):
        post = (x - t.x) / p
        rails = (np.abs(y - (top + 0.3 * h)) < 0.1 * h) | (np.abs(y - (top + 0.7 * h)) < 0.1 * h)
        return rails | (post - np.floor(post) < 0.3)

    c.paint(
        (top, t.x - k["w"] / 2, t.y, t.x + k["w"] / 2),
        t.paints["fence"],
        object_id("fence"),
        0,
        shape,
    )


def _draw_table(c: Canvas, t: Instance) -> None:
    w, h, o = t.knobs["w"], t.knobs["h"], object_id("table")
    for lx in (t.x - 0.4 * w, t.x + 0.4 * w):
        c.paint((t.y - h, lx - 0.03 * w, t.y, lx + 0.03 * w), t.paints["leg"], o, part_id("leg"))
    c.paint(
        (t.y - h - 0.12 * h, t.x - w / 2, t.y - h + 0.12 * h, t.x + w / 2),
        t.paints["top"],
        o,
        part_id("top"),
    )


def _draw_chair(c: Canvas, t: Instance) -> None:
    w, f, o = t.knobs["w"], t.knobs["facing"], object_id("chair")
    seat = t.y - 0.9 * w
    for lx in (t.x - 0.42 * w, t.x + 0.42 * w):
        c.paint((seat, lx - 0.06 * w, t.y, lx + 0.06 * w), t.paints["leg"], o, part_id("leg"))
    c.paint(
        (seat - 0.12 * w, t.x - w / 2, seat + 0.06 * w, t.x + w / 2),
        t.paints["seat"],
        o,
        part_id("seat"),
    )
    bx = t.x - f * 0.42 * w
    c.paint(
        (seat - 1.0 * w, bx - 0.08 * w, seat - 0.12 * w, bx + 0.08 * w),
        t.paints["back"],
        o,
        part_id("back"),
    )


def _draw_cabinet(c: Canvas, t: Instance) -> None:
    w, h, o = t.knobs["w"], t.knobs["h"], object_id("cabinet")
    top = t.y - h
    c.paint((top, t.x - w / 2, t.y, t.x + w / 2), t.paints["frame"], o)
    m = 0.05 * w
    c.paint(
        (top + m, t.x - w / 2 + m, top + 0.28 * h, t.x + w / 2 - m),
        t.paints["drawer"],
        o,
        part_id("drawer"),
    )
    for a, b in ((t.x - w / 2 + m, t.x - m / 2), (t.x + m / 2, t.x + w / 2 - m)):
        c.paint((top + 0.28 * h + m, a, t.y - m, b), t.paints["door"], o, part_id("door"))


def _draw_cloud(c: Canvas, t: Instance) -> None:
    w, h, o = t.knobs["w"], t.knobs["h"], object_id("cloud")
    for dx, dy, sc in ((-0.3, 0.0, 0.7), (0.0, -0.35, 1.0), (0.3, 0.0, 0.75)):
        cy, cx, ry, rx = t.y + dy * h, t.x + dx * w, sc * h, sc * 0.45 * w
        c.paint(
            (cy - ry, cx - rx, cy + ry, cx + rx), t.paints["cloud"], o, 0, ellipse(cy, cx, ry, rx)
        )


def _draw_sun(c: Canvas, t: Instance) -> None:
    r = t.knobs["r"]
    c.paint(
        (t.y - r, t.x - r, t.y + r, t.x + r),
        t.paints["sun"],
        object_id("sun"),
        0,
        ellipse(t.y, t.x, r, r),
    )


def _draw_mountain(c: Canvas, t: Instance) -> None:
    w, h, o = t.knobs["w"], t.knobs["h"], object_id("mountain")
    peak = [(t.y, t.x - w / 2), (t.y, t.x + w / 2), (t.y - h, t.x)]
    c.paint(bounds(peak), t.paints["mountain"], o, 0, polygon(peak))
    sn = t.knobs["snow"]
    if sn > 0.15:
        cap = [
            (t.y - h + sn * h, t.x - sn * w / 2),
            (t.y - h + sn * h, t.x + sn * w / 2),
            (t.y - h, t.x),
        ]
        c.paint(bounds(cap), t.paints["snow"], o, 0, polygon(cap))


Kind = tuple[Callable[[Rand, Instance], None], Callable[[Canvas, Instance], None]]

KINDS: dict[str, Kind] = {
    "house": (_sample_house, _draw_house),
    "tree": (_sample_tree, _draw_tree),
    "car": (_sample_car, _draw_car),
    "person": (_sample_person, _draw_person),
    "cow": (_sample_cow, _draw_cow),
    "boat": (_sample_boat, _draw_boat),
    "umbrella": (_sample_umbrella, _draw_umbrella),
    "fence": (_sample_fence, _draw_fence),
    "table": (_sample_table, _draw_table),
    "chair": (_sample_chair, _draw_chair),
    "cabinet": (_sample_cabinet, _draw_cabinet),
    "cloud": (_sample_cloud, _draw_cloud),
    "sun": (_sample_sun, _draw_sun),
    "mountain": (_sample_mountain, _draw_mountain),
}


def sample_object(rng: Rand, kind: str, y: float, x: float, s: float) -> Instance:
    """Sample an instance of ``kind`` standing at (y, x) with scale ``s``."""
    inst = Instance(kind, float(y), float(x), float(s))
    KINDS[kind][0](rng, inst)
    return inst


def draw_object(canvas: Canvas, inst: Instance) -> None:
    """Draw ``inst`` on ``canvas`` (labels included)."""
    KINDS[inst.kind][1](canvas, inst)
