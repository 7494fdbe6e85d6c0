"""A faster gymnasium CarRacing whose observations are bit-identical to upstream's.

Rendering the 96x96 observation is almost all of a CarRacing step upstream; this subclass
draws the same pixels with vectorised transforms, culling and per-episode caches, each piece
argued to leave every observed pixel unchanged in docs/fast_carracing.md, and checked against
gymnasium's own env by tests/test_fast_carracing.py (envs/carracing.py falls back to
gymnasium's env outside the verified versions).
"""

from __future__ import annotations

import math
import re
import sys
import warnings

import gymnasium
import numpy as np
import pygame
from gymnasium.envs.box2d.car_dynamics import SIZE, WHEEL_R, WHEEL_W, WHEEL_WHITE
from gymnasium.envs.box2d.car_racing import (
    GRASS_DIM,
    MAX_SHAPE_DIM,
    PLAYFIELD,
    SCALE,
    STATE_H,
    STATE_W,
    VIDEO_H,
    VIDEO_W,
    WINDOW_H,
    WINDOW_W,
    ZOOM,
    CarRacing,
)
from pygame import gfxdraw

__all__ = ["FastCarRacing", "VERIFIED_GYMNASIUM", "fast_env_supported"]

# gymnasium versions whose CarRacing this module was checked bit-exact against: the test suite
# passed with each of 1.0.0, 1.1.1, 1.2.2, 1.3.0 and 1.4.0 (car_racing.py/car_dynamics.py of
# 1.1.0 and 1.2.0/1.2.1 are byte-identical to 1.1.1 and 1.2.2), on pygame-ce 2.5.8, Box2D 2.3.10,
# numpy 2.4, x86-64 Linux. Lower bound inclusive, upper not. The pixel-level premises that
# depend on pygame/Box2D internals are re-checked at run time (see the self-checks below).
VERIFIED_GYMNASIUM = (">=1.0", "<1.5")


# --------------------------------------------------------------------------- version gate


def _version_tuple(version: str) -> tuple[int, ...]:
    """'1.4.0' -> (1, 4, 0); '1.5.0rc1' -> (1, 5, 0); '2' -> (2,). Non-numeric tails ignored."""
    parts = []
    for piece in version.strip().split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # '0rc1': keep the 0, stop at the pre-release tag
            break
    return tuple(parts)


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


_OPS = {
    ">=": lambda c: c >= 0,
    ">": lambda c: c > 0,
    "<=": lambda c: c <= 0,
    "<": lambda c: c < 0,
    "==": lambda c: c == 0,
    "!=": lambda c: c != 0,
}


def _version_in_range(version: str, specs=VERIFIED_GYMNASIUM) -> bool:
    """True if `version` satisfies every spec such as '>=1.0' or '<1.5' (a tiny PEP 440 subset).

    Pre-releases count as their release ('1.5.0rc1' is 1.5.0, so outside '<1.5').
    """
    have = _version_tuple(version)
    if not have:
        return False
    for spec in specs:
        match = re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9.]*)\s*", spec)
        if match is None:
            raise ValueError(f"unsupported version spec {spec!r}")
        op, bound = match.groups()
        if not _OPS[op](_compare(have, _version_tuple(bound))):
            return False
    return True


_warned_unsupported = False


def fast_env_supported(version: str | None = None) -> bool:
    """Whether the installed gymnasium is in :data:`VERIFIED_GYMNASIUM`.

    Outside it, warns (once per process) that gymnasium's own CarRacing will be used, and
    returns False. `version` replaces the installed version string (for tests).
    """
    global _warned_unsupported
    version = gymnasium.__version__ if version is None else version
    if _version_in_range(version):
        return True
    if not _warned_unsupported:
        _warned_unsupported = True
        warnings.warn(
            f"envs.fast_carracing is verified bit-exact for gymnasium "
            f"{','.join(VERIFIED_GYMNASIUM)}, but gymnasium {version} is installed: "
            f"the upstream CarRacing env will be used instead (same behaviour, slower).",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


_GYM_VERSION = _version_tuple(gymnasium.__version__)


def _reward_text(reward: float) -> str:
    """The reward string upstream's `_render` shows, for the installed gymnasium version."""
    if _compare(_GYM_VERSION, (1, 3)) < 0:
        return f"{int(reward):04d}"  # gymnasium 1.0 .. 1.2
    if _compare(_GYM_VERSION, (1, 4)) < 0:
        return f"{reward:04}"  # gymnasium 1.3
    return f"{reward:04.0f}"  # gymnasium 1.4


# gymnasium up to 1.3 called pygame.init() before opening the human-mode window.
_PYGAME_INIT_FOR_HUMAN = _compare(_GYM_VERSION, (1, 4)) < 0


# --------------------------------------------------------------------------- geometry


def _grass_polygons() -> np.ndarray:
    """Upstream's grass squares, built with the very same float expressions: (400, 4, 2)."""
    grass = []
    for x in range(-20, 20, 2):
        for y in range(-20, 20, 2):
            grass.append(
                [
                    (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + 0),
                    (GRASS_DIM * x + 0, GRASS_DIM * y + 0),
                    (GRASS_DIM * x + 0, GRASS_DIM * y + GRASS_DIM),
                    (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + GRASS_DIM),
                ]
            )
    return np.array(grass, dtype=np.float64)


_GRASS = _grass_polygons()
_FIELD = np.array(
    [(PLAYFIELD, PLAYFIELD), (PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, PLAYFIELD)],
    dtype=np.float64,
)

# Upstream's culling box: a polygon is drawn if any vertex lies in it (bounds inclusive).
_CULL_LO = -MAX_SHAPE_DIM
_CULL_X_HI = WINDOW_W + MAX_SHAPE_DIM
_CULL_Y_HI = WINDOW_H + MAX_SHAPE_DIM

# The status bar: upstream paints rows [_BAR_TOP, WINDOW_H) of the *flipped* image opaque
# black before drawing the indicators and the text, so canvas rows [0, WINDOW_H - _BAR_TOP)
# (which the flip moves there) never reach the observation.
_BAR_TOP = int(WINDOW_H - 5 * (WINDOW_H / 40.0))  # 700
assert _BAR_TOP == WINDOW_H - 5 * (WINDOW_H / 40.0)
_HIDDEN_CANVAS_ROWS = WINDOW_H - _BAR_TOP  # 100

# A polygon whose vertices all lie more than this many px beyond one side of the visible part
# of the canvas writes no visible pixel (pixels land within ~2 px of the vertices' hull).
_OFFSCREEN_MARGIN = 4.0

# The background shortcut needs the playfield square to contain the window grown by this many
# px: far more than the <= 2 px by which truncation, fixed-point scan-line rounding and the
# antialiased outline can move an edge's pixels.
_BG_MARGIN = 8.0
# ... and every vertex within +-16000 px, so SDL_gfx's 16-bit coordinates and 16.16 fixed-point
# edge intersections cannot overflow (true whenever the car is on the playfield, which the
# containment test implies anyway).
_BG_MAX_COORD = 16000.0


def _rotation(angle: float) -> tuple[float, float]:
    """(cos, sin) exactly as pygame's `Vector2.rotate_rad(angle)` uses them.

    Rotating (1, 0) returns (cos*1 - sin*0, sin*1 + cos*0) = (cos, sin) exactly, after pygame's
    own fmod normalisation; at the 0/90/180/270-degree special cases it returns exact unit
    vectors, with which `cos*x - sin*y`, `sin*x + cos*y` reproduce the special-case results
    (up to the sign of a zero, which `* zoom + translation` and pixel conversion erase).
    """
    c, s = pygame.math.Vector2(1.0, 0.0).rotate_rad(angle)
    return c, s


def _rotate_scale_translate(x, y, angle: float, zoom: float, translation):
    """Screen coordinates of world coordinates `x`, `y` (arrays of any matching shape).

    Exactly upstream's per-vertex arithmetic: pygame's rotation `cos*x - sin*y`,
    `sin*x + cos*y` (IEEE doubles, no fused multiply-add), then `c[0] * zoom + translation[0]`.
    """
    c, s = _rotation(angle)
    return (c * x - s * y) * zoom + translation[0], (s * x + c * y) * zoom + translation[1]


def _transform_numpy(points: np.ndarray, angle: float, zoom: float, translation) -> np.ndarray:
    """Rotate, scale, translate `points` (..., 2) like upstream `_draw_colored_polygon`."""
    x, y = _rotate_scale_translate(points[..., 0], points[..., 1], angle, zoom, translation)
    return np.stack((x, y), axis=-1)


def _transform_vector2(points: np.ndarray, angle: float, zoom: float, translation) -> np.ndarray:
    """Per-vertex fallback running upstream's own code (used only if the self-check fails)."""
    flat = points.reshape(-1, 2).tolist()
    rotated = [pygame.math.Vector2(p).rotate_rad(angle) for p in flat]
    out = [(r[0] * zoom + translation[0], r[1] * zoom + translation[1]) for r in rotated]
    return np.array(out, dtype=np.float64).reshape(points.shape)


def _numpy_matches_vector2(trials: int = 200) -> bool:
    """Bit-for-bit self-check of `_transform_numpy` against pygame on random inputs."""
    rng = np.random.default_rng(12345)
    special = [k * math.pi / 2 for k in range(-8, 9)] + [1e-9, -1e-9, 2 * math.pi - 1e-7]
    angles = special + rng.uniform(-50.0, 50.0, size=trials).tolist()
    for i, angle in enumerate(angles):
        pts = rng.uniform(-400.0, 400.0, size=(8, 2))
        zoom = float(rng.uniform(0.5, 20.0)) if i % 2 else ZOOM * SCALE
        translation = tuple(rng.uniform(-8000.0, 8000.0, size=2).tolist())
        if not np.array_equal(
            _transform_numpy(pts, angle, zoom, translation),
            _transform_vector2(pts, angle, zoom, translation),
        ):
            return False
    return True


_numpy_ok = None


def _numpy_transform_ok() -> bool:
    """Whether numpy reproduces pygame's Vector2 arithmetic here (checked once per process)."""
    global _numpy_ok
    if _numpy_ok is None:
        _numpy_ok = _numpy_matches_vector2()
    return _numpy_ok


def _transform(points: np.ndarray, angle: float, zoom: float, translation) -> np.ndarray:
    """(..., 2) world points -> screen points, bit-identical to upstream's Vector2 code."""
    if _numpy_transform_ok():
        return _transform_numpy(points, angle, zoom, translation)
    return _transform_vector2(points, angle, zoom, translation)


def _transform_xy(x: np.ndarray, y: np.ndarray, angle: float, zoom: float, translation):
    """Like `_transform` for coordinates held in two separate arrays (any matching shape)."""
    if _numpy_transform_ok():
        return _rotate_scale_translate(x, y, angle, zoom, translation)
    pts = _transform_vector2(np.stack((x, y), axis=-1), angle, zoom, translation)
    return pts[..., 0], pts[..., 1]


def _drawn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the polygons that need drawing, in upstream order.

    `x`, `y`: screen coordinates, shape (V, N): vertex-major, so every operation below runs
    on contiguous rows. Kept: the polygons upstream's culling keeps (any vertex inside its
    box, the same comparisons), minus those lying wholly beyond one side of the visible canvas
    (see `_OFFSCREEN_MARGIN`).
    """
    inside = (_CULL_LO <= x) & (x <= _CULL_X_HI) & (_CULL_LO <= y) & (y <= _CULL_Y_HI)
    idx = np.flatnonzero(np.logical_or.reduce(inside, axis=0))
    xs, ys = x[:, idx], y[:, idx]  # the few upstream keeps
    m = _OFFSCREEN_MARGIN
    hidden = (
        (xs.max(axis=0) < -m)
        | (xs.min(axis=0) > WINDOW_W - 1 + m)
        | (ys.max(axis=0) < _HIDDEN_CANVAS_ROWS - m)
        | (ys.min(axis=0) > WINDOW_H - 1 + m)
    )
    return idx[~hidden]


def _window_inside_field(angle: float, zoom: float, translation, margin: float = _BG_MARGIN) -> bool:
    """True if upstream's playfield square contains the window grown by `margin` px.

    On screen the square is centred on `translation` (the world origin's image), rotated by
    `angle`, with half side `PLAYFIELD * zoom`; a point is inside if, rotated back about that
    centre, both coordinates are within the half side. Tested on the grown window's corners
    (square and rectangle are convex), with one extra px for float rounding. Also requires all
    square vertices within +-_BG_MAX_COORD px (|centre| + half side * sqrt(2) bounds them).
    """
    half = PLAYFIELD * zoom
    tx, ty = translation
    if max(abs(tx), abs(ty)) + half * 1.4143 > _BG_MAX_COORD:
        return False
    c, s = _rotation(angle)
    limit = half - margin - 1.0
    for cx in (-margin, WINDOW_W - 1 + margin):
        for cy in (-margin, WINDOW_H - 1 + margin):
            dx, dy = cx - tx, cy - ty
            if abs(c * dx + s * dy) > limit or abs(c * dy - s * dx) > limit:
                return False
    return True


def _box2d_mul_numpy(local: np.ndarray, c, s, px, py) -> np.ndarray:
    """Box2D's `b2Mul(transform, vec)` (what `body.transform * v` runs), in float32 like Box2D:
    x = (c*vx - s*vy) + px, y = (s*vx + c*vy) + py, every operation rounded to float32.
    `local` is (K, 2) float32; c, s, px, py are float32 scalars or (K,) arrays."""
    vx, vy = local[:, 0], local[:, 1]
    out = np.empty(local.shape, dtype=np.float32)
    out[:, 0] = (c * vx - s * vy) + px
    out[:, 1] = (s * vx + c * vy) + py
    return out


def _box2d_mul_matches(trials: int = 300) -> bool:
    """Self-check of `_box2d_mul_numpy` against Box2D itself, bit for bit."""
    import Box2D

    rng = np.random.default_rng(4321)
    for _ in range(trials):
        transform = Box2D.b2Transform()
        transform.position = tuple(rng.uniform(-400.0, 400.0, size=2).tolist())
        transform.angle = float(rng.uniform(-60.0, 60.0))
        v = tuple(rng.uniform(-3.0, 3.0, size=2).tolist())
        expected = transform * v
        q, p = transform.q, transform.position
        f32 = np.float32
        got = _box2d_mul_numpy(np.array([v], dtype=np.float32), f32(q.c), f32(q.s), f32(p[0]), f32(p[1]))
        if (float(got[0, 0]), float(got[0, 1])) != (expected[0], expected[1]):
            return False
    return True


_box2d_ok = None


def _split_scale_matches(fmt_surface) -> bool:
    """Self-check of the premise of `FastCarRacing._state_pixels` on this pygame build.

    On a random canvas and status bar: shrinking canvas rows 100-799 in X, reversing the rows,
    stacking the X-shrunk status bar below and shrinking that in Y must equal
    `smoothscale(flipped canvas with the bar pasted over rows 700-799, (96, 96))` bit for bit.
    """
    rng = np.random.default_rng(777)

    def random_surface(w, h):
        surf = pygame.Surface((w, h), 0, fmt_surface)
        pygame.surfarray.pixels3d(surf)[...] = rng.integers(0, 256, size=(w, h, 3), dtype=np.uint8)
        return surf

    hidden, bar_h = _HIDDEN_CANVAS_ROWS, WINDOW_H - _BAR_TOP
    canvas, bar = random_surface(WINDOW_W, WINDOW_H), random_surface(WINDOW_W, bar_h)
    final = pygame.transform.flip(canvas, False, True)
    final.blit(bar, (0, _BAR_TOP))
    expected = pygame.surfarray.array3d(pygame.transform.smoothscale(final, (STATE_W, STATE_H)))

    top = pygame.transform.smoothscale(
        canvas.subsurface((0, hidden, WINDOW_W, _BAR_TOP)), (STATE_W, _BAR_TOP)
    )
    low = pygame.transform.smoothscale(bar, (STATE_W, bar_h))
    both = pygame.Surface((STATE_W, WINDOW_H), 0, fmt_surface)
    both.blit(pygame.transform.flip(top, False, True), (0, 0))
    both.blit(low, (0, _BAR_TOP))
    got = pygame.surfarray.array3d(pygame.transform.smoothscale(both, (STATE_W, STATE_H)))
    return bool(np.array_equal(expected, got))


_split_scale_ok = {}  # pixel format -> result of `_split_scale_matches`


def _rgb_array(surface) -> np.ndarray:
    """`np.transpose(np.array(pixels3d(surface)), (1, 0, 2))`, upstream's conversion, faster.

    Upstream's result is a C-contiguous (H, W, 3) uint8 array of the R, G, B channels. For a
    surface with 8-bit channels in 32-bit pixels the same array is picked straight out of the
    raw pixel bytes (numpy copies the strided (x, y, c) view ~5x slower than this).
    """
    masks, shifts = surface.get_masks(), surface.get_shifts()
    if (
        surface.get_bytesize() != 4
        or sys.byteorder != "little"
        or any(masks[i] != 0xFF << shifts[i] for i in range(3))
    ):
        return np.transpose(np.array(pygame.surfarray.pixels3d(surface)), axes=(1, 0, 2))
    w, h = surface.get_size()
    raw = np.frombuffer(surface.get_buffer(), dtype=np.uint8)
    raw = raw.reshape(h, surface.get_pitch())[:, : 4 * w].reshape(h, w, 4)
    out = np.empty((h, w, 3), dtype=np.uint8)
    for channel in range(3):  # R, G, B: byte index shift // 8 on a little-endian machine
        out[..., channel] = raw[..., shifts[channel] // 8]
    return out


# --------------------------------------------------------------------------- the env


class FastCarRacing(CarRacing):
    """gymnasium's `CarRacing` with a faster renderer producing bit-identical pixels.

    Same constructor, spaces, `reset`/`step` (inherited unchanged), rewards, termination, info,
    `domain_randomize`, `continuous`, `lap_complete_percent` and render modes. Only the drawing
    is reorganised; the module docstring explains why each piece draws the same pixels.

    Differences that are not pixels: `self.surf` is a reused surface, and after a
    "state_pixels" render it holds only the status bar (the observation is assembled without
    building the full 1000x800 image); after "human"/"rgb_array" renders it is the full image.

    Skipping renders (for action repeat): set `skip_render = True` before a `step` and that
    step's "state_pixels" render draws nothing (one-shot: the flag is cleared by it). The step
    then returns (and `self.state` holds) a copy of the last frame actually drawn: *stale*;
    `frame_skipped` is True until a frame is drawn again. `draw_skipped_frame()` draws the
    skipped frame exactly (bit-identical to upstream's for that step) as long as no other
    `step`/`reset` came in between. `reset` always draws its frame. "human"/"rgb_array"
    renders are never skipped. Physics, rewards, termination, info and `t` are unaffected.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        verbose: bool = False,
        lap_complete_percent: float = 0.95,
        domain_randomize: bool = False,
        continuous: bool = True,
    ):
        super().__init__(
            render_mode=render_mode,
            verbose=verbose,
            lap_complete_percent=lap_complete_percent,
            domain_randomize=domain_randomize,
            continuous=continuous,
        )
        self._drop_render_caches()
        self.skip_render = False  # one-shot: the next "state_pixels" render draws nothing
        self.frame_skipped = False  # True while `self.state` is older than the last step
        self._skipped_reward = 0.0  # `self.reward` when the skipped frame would have been drawn

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.skip_render = False  # the reset frame is always drawn
        return super().reset(seed=seed, options=options)

    def draw_skipped_frame(self) -> np.ndarray:
        """The observation of the latest step, drawing it now if that step skipped it.

        Exact only right after that step (before any other `step`/`reset`): the frame is drawn
        from the current state with `self.reward` set back to its value at render time.
        """
        if self.frame_skipped:
            reward, self.reward = self.reward, self._skipped_reward
            try:
                self.state = self._render("state_pixels")
            finally:
                self.reward = reward
        return self.state

    # ---- caches ---------------------------------------------------------------------------

    def _drop_render_caches(self):
        self._surfaces_key = None  # display the surfaces' pixel format was taken from
        self._surfaces = {}  # name -> reused Surface
        self._font = None
        self._text = None  # (string, rendered surface)
        self._scene_src = None  # (road_poly list, its length) the polygon cache belongs to
        self._scene = None
        self._mapped = {}  # colour -> pixel value gfxdraw writes for it
        self._car_src = None  # the Car the vertex plan belongs to
        self._car_plan_cache = None

    def _surface(self, name: str, size: tuple[int, int]):
        """A reused surface in the pixel format `pygame.Surface((W, H))` gets right now.

        A new Surface's default format follows the display if one is open, so everything is
        recreated when the display surface changes.
        """
        display = pygame.display.get_surface() if pygame.display.get_init() else None
        key = id(display) if display is not None else None
        if key != self._surfaces_key:
            self._surfaces_key = key
            self._surfaces = {}
            self._mapped = {}
        surf = self._surfaces.get(name)
        if surf is None:
            canvas = self._surfaces.get("canvas")
            if canvas is None:  # the first one: exactly how upstream creates its canvas
                surf = canvas = pygame.Surface((WINDOW_W, WINDOW_H))
                self._surfaces["canvas"] = canvas
                if name == "canvas":
                    return surf
            surf = pygame.Surface(size, 0, canvas)  # same format as the canvas
            self._surfaces[name] = surf
        return surf

    def _scene_polygons(self) -> tuple[np.ndarray, np.ndarray]:
        """World x, y of the 400 grass squares, then the N road/kerb polygons of `road_poly`,
        each shaped (4, 400 + N) (vertex-major).

        Both are fixed for a track (road vertices are built once in `_create_track`), so the
        arrays are rebuilt only when `road_poly` is a different list or changed length.
        """
        road_poly = self.road_poly
        if (
            self._scene_src is None
            or self._scene_src[0] is not road_poly
            or self._scene_src[1] != len(road_poly)
        ):
            road = np.array(
                [[(p[0], p[1]) for p in poly] for poly, _ in road_poly], dtype=np.float64
            ).reshape(-1, 4, 2)
            scene = np.concatenate([_GRASS, road])  # (400 + N, 4, 2)
            self._scene = (
                np.ascontiguousarray(scene[:, :, 0].T),
                np.ascontiguousarray(scene[:, :, 1].T),
            )
            self._scene_src = (road_poly, len(road_poly))
        return self._scene

    def _mapped_color(self, surface, color) -> int:
        """The exact pixel value `gfxdraw.filled_polygon` writes for `color` on `surface`."""
        key = tuple(color.tolist()) if isinstance(color, np.ndarray) else tuple(color)
        value = self._mapped.get(key)
        if value is None:
            scratch = pygame.Surface((4, 4), 0, surface)
            gfxdraw.filled_polygon(scratch, [(0, 0), (3, 0), (3, 3), (0, 3)], color)
            value = scratch.get_at_mapped((1, 1))
            self._mapped[key] = value
        return value

    def _reward_text_surface(self):
        """Upstream loads the font and renders the reward every frame; same font and same
        string give the same surface, so one font and the last rendered string are kept."""
        string = _reward_text(self.reward)
        if self._text is None or self._text[0] != string:
            try:
                text = self._font.render(string, True, (255, 255, 255), (0, 0, 0))
            except (AttributeError, pygame.error):  # no font yet, or font module restarted
                self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
                text = self._font.render(string, True, (255, 255, 255), (0, 0, 0))
            self._text = (string, text)
        return self._text[1]

    # ---- rendering ------------------------------------------------------------------------

    def _render(self, mode: str):
        assert mode in self.metadata["render_modes"]

        pygame.font.init()
        if self.screen is None and mode == "human":
            if _PYGAME_INIT_FOR_HUMAN:
                pygame.init()
            pygame.display.init()
            self.screen = pygame.display.set_mode((WINDOW_W, WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()

        if "t" not in self.__dict__:
            return  # reset() not called yet

        if mode == "state_pixels":
            if self.skip_render:  # a copy of the last drawn frame; remember what this one shows
                self.skip_render = False
                self.frame_skipped = True
                self._skipped_reward = self.reward
                return self.state.copy()  # a fresh array per step, as gymnasium expects
            self.frame_skipped = False

        canvas = self._surface("canvas", (WINDOW_W, WINDOW_H))
        self.surf = canvas

        assert self.car is not None
        # computing transformations (verbatim from upstream)
        angle = -self.car.hull.angle
        # Animating first second zoom.
        zoom = 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (WINDOW_W / 2 + trans[0], WINDOW_H / 4 + trans[1])

        self._render_road(zoom, trans, angle)
        if mode == "state_pixels" and self._car_fast_ok():
            self._draw_car(self.surf, zoom, trans, angle)  # no particles in this mode
        else:
            self.car.draw(
                self.surf,
                zoom,
                trans,
                angle,
                mode not in ["state_pixels_list", "state_pixels"],
            )

        if mode == "state_pixels" and self._split_scale_ok(canvas):
            state = self._state_pixels(canvas)
            if state is not None:
                return state

        # plain tail, as upstream: flip, status bar, then show / scale
        self.surf = self._flip_vertical(canvas, self._surface("flipped", (WINDOW_W, WINDOW_H)))
        self._render_status_bar()

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (VIDEO_W, VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (STATE_W, STATE_H))
        else:
            return self.isopen

    @staticmethod
    def _split_scale_ok(canvas) -> bool:
        """32-bit canvas, and `_split_scale_matches` holds for its format (checked once)."""
        if canvas.get_bytesize() != 4:
            return False
        key = (canvas.get_bitsize(), canvas.get_masks())
        if key not in _split_scale_ok:
            _split_scale_ok[key] = _split_scale_matches(canvas)
        return _split_scale_ok[key]

    @staticmethod
    def _car_fast_ok() -> bool:
        global _box2d_ok
        if _box2d_ok is None:
            _box2d_ok = _box2d_mul_matches()
        return _box2d_ok

    def _car_plan(self):
        """Per car: [(body, local vertices as float32 (n, 2))] in `Car.draw`'s order (wheels,
        then the hull's fixtures). Fixture shapes never change, so this is built once per car."""
        car = self.car
        if self._car_src is not car:
            plan = []
            for obj in car.drawlist:
                for f in obj.fixtures:
                    plan.append((obj, np.array(f.shape.vertices, dtype=np.float32).reshape(-1, 2)))
            self._car_plan_cache = plan
            self._car_src = car
        return self._car_plan_cache

    def _draw_car(self, surface, zoom, translation, angle):
        """`Car.draw(surface, zoom, translation, angle, draw_particles=False)`, vectorised.

        Upstream, per fixture: `body.transform * v` (Box2D, float32) for each vertex, then a
        `Vector2.rotate_rad(angle)`, `* zoom + translation` (float64), and `draw.polygon` with
        the body's colour; wheels also get a grey stripe polygon from their `phase`, built with
        the same expressions and transformed the same way. Here all vertices go through
        `_box2d_mul_numpy` (checked bit-exact against Box2D) and `_transform` (checked against
        `Vector2`) at once; the polygons are then drawn one by one in upstream's order.
        """
        locals_, params, kinds = [], [], []  # kinds: colour for each polygon
        f32 = np.float32
        for obj, local in self._car_plan():
            transform = obj.transform
            q, p = transform.q, transform.position
            param = (f32(q.c), f32(q.s), f32(p[0]), f32(p[1]))
            locals_.append(local)
            params.append(param)
            kinds.append([int(c * 255) for c in obj.color])
            if "phase" not in obj.__dict__:
                continue
            # the wheel's stripe, exactly as upstream computes it
            a1 = obj.phase
            a2 = obj.phase + 1.2  # radians
            s1 = math.sin(a1)
            s2 = math.sin(a2)
            c1 = math.cos(a1)
            c2 = math.cos(a2)
            if s1 > 0 and s2 > 0:
                continue
            if s1 > 0:
                c1 = np.sign(c1)
            if s2 > 0:
                c2 = np.sign(c2)
            white_poly = [
                (-WHEEL_W * SIZE, +WHEEL_R * c1 * SIZE),
                (+WHEEL_W * SIZE, +WHEEL_R * c1 * SIZE),
                (+WHEEL_W * SIZE, +WHEEL_R * c2 * SIZE),
                (-WHEEL_W * SIZE, +WHEEL_R * c2 * SIZE),
            ]
            locals_.append(np.array(white_poly, dtype=np.float32))  # b2Vec2 holds float32
            params.append(param)
            kinds.append(WHEEL_WHITE)

        counts = [len(v) for v in locals_]
        per_vertex = np.repeat(np.array(params, dtype=np.float32), counts, axis=0)
        world = _box2d_mul_numpy(
            np.concatenate(locals_), per_vertex[:, 0], per_vertex[:, 1], per_vertex[:, 2], per_vertex[:, 3]
        )
        screen = _transform(world.astype(np.float64), angle, zoom, translation).tolist()
        start = 0
        for n, color in zip(counts, kinds):
            path = [tuple(v) for v in screen[start : start + n]]
            pygame.draw.polygon(surface, color=color, points=path)
            start += n

    def _render_status_bar(self):
        """Upstream's indicators and reward text, drawn on `self.surf` (flipped orientation)."""
        self._render_indicators(WINDOW_W, WINDOW_H)
        text = self._reward_text_surface()
        text_rect = text.get_rect()
        text_rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)

    def _state_pixels(self, canvas):
        """The 96x96 observation from the unflipped canvas; None if this frame can't use it.

        Equal to `smoothscale(final, (96, 96))` where `final` is upstream's flipped canvas with
        the status bar drawn on rows 700-799, because pygame's smoothscale is
        `shrink_Y(shrink_X(image))` and `shrink_X` works on each row on its own:

        * rows 0-699 of `shrink_X(final)` are `shrink_X` of canvas rows 799..100, i.e. the rows
          of `shrink_X(canvas[100:800])` in reverse order;
        * rows 700-799 are `shrink_X` of the status bar alone: its black rectangle covers those
          rows completely and the bars and text on it are opaque, so nothing of the canvas
          shows there. The bar is drawn with the unchanged upstream calls onto its own surface.

        Both halves are stacked into a 96x800 surface (the intermediate smoothscale builds
        internally) and its Y pass is run by `smoothscale` on that. If any indicator reaches
        above row 700 (it would cover road pixels), the sentinel row 699 changes and None is
        returned, so the caller takes the plain path for this frame.
        """
        bar = self._surface("status_bar", (WINDOW_W, WINDOW_H))
        sentinel = bar.map_rgb((1, 2, 3))  # no indicator or text colour
        bar.fill(sentinel, (0, _BAR_TOP - 1, WINDOW_W, 1))
        self.surf = bar
        self._render_status_bar()
        row = pygame.surfarray.pixels2d(bar)[:, _BAR_TOP - 1]
        overflow = bool((row != sentinel).any())
        del row  # release the surface lock
        if overflow:
            return None

        top = self._surface("shrunk_top", (STATE_W, _BAR_TOP))
        low = self._surface("shrunk_bar", (STATE_W, WINDOW_H - _BAR_TOP))
        both = self._surface("shrunk_x", (STATE_W, WINDOW_H))
        pygame.transform.smoothscale(
            canvas.subsurface((0, _HIDDEN_CANVAS_ROWS, WINDOW_W, _BAR_TOP)), (STATE_W, _BAR_TOP), top
        )
        pygame.transform.smoothscale(
            bar.subsurface((0, _BAR_TOP, WINDOW_W, WINDOW_H - _BAR_TOP)),
            (STATE_W, WINDOW_H - _BAR_TOP),
            low,
        )
        dst = pygame.surfarray.pixels2d(both)  # (x, y) views of raw 32-bit pixels
        dst[:, :_BAR_TOP] = pygame.surfarray.pixels2d(top)[:, ::-1]
        dst[:, _BAR_TOP:] = pygame.surfarray.pixels2d(low)
        del dst
        return self._create_image_array(both, (STATE_W, STATE_H))

    @staticmethod
    def _flip_vertical(src, dst):
        """`pygame.transform.flip(src, False, True)` into a preallocated surface.

        A vertical flip only reverses the row order; copying the raw pixel values with the row
        index reversed is the same image (without allocating a new 3 MB surface per frame).
        """
        if src.get_bytesize() != 4:
            return pygame.transform.flip(src, False, True)
        a = pygame.surfarray.pixels2d(src)  # (W, H) views; index [x, y]
        b = pygame.surfarray.pixels2d(dst)
        b[...] = a[:, ::-1]
        del a, b  # release the surface locks before anything blits onto dst
        return dst

    def _render_road(self, zoom, translation, angle):
        """Background, grass and road, drawing what upstream draws (see module docstring)."""
        surf = self.surf

        # background: the playfield square, never culled upstream
        if _window_inside_field(angle, zoom, translation):
            # rows [0, 100) end up under the status bar: only the visible rows need the fill
            visible = (0, _HIDDEN_CANVAS_ROWS, WINDOW_W, WINDOW_H - _HIDDEN_CANVAS_ROWS)
            surf.fill(self._mapped_color(surf, self.bg_color), visible)
        else:
            surf.fill(0)  # what upstream's freshly allocated surface holds
            poly = _transform(_FIELD, angle, zoom, translation).tolist()
            gfxdraw.aapolygon(surf, poly, self.bg_color)
            gfxdraw.filled_polygon(surf, poly, self.bg_color)

        # grass patches, then road tiles and kerbs, in upstream's order. The grass colour is
        # one object for all patches; road colours are read now (tiles mutate theirs).
        x, y = _transform_xy(*self._scene_polygons(), angle, zoom, translation)
        idx = _drawn(x, y)
        polys = np.stack((x[:, idx].T, y[:, idx].T), axis=-1).tolist()  # [[[x, y], ...], ...]
        grass_color = self.grass_color
        road_poly = self.road_poly
        n_grass = len(_GRASS)
        for i, poly in zip(idx.tolist(), polys):
            if i < n_grass:
                color = grass_color
            else:
                color = [int(c) for c in road_poly[i - n_grass][1]]
            gfxdraw.aapolygon(surf, poly, color)
            gfxdraw.filled_polygon(surf, poly, color)

    def _create_image_array(self, screen, size):
        """Upstream's smoothscale + transpose, scaling into a reused surface in the format a
        fresh `smoothscale` result has (that of `screen`)."""
        name = f"scaled_{size[0]}x{size[1]}"
        dest = self._surface(name, size)
        if dest.get_bitsize() != screen.get_bitsize() or dest.get_masks() != screen.get_masks():
            dest = self._surfaces[name] = pygame.Surface(size, 0, screen)
        pygame.transform.smoothscale(screen, size, dest)
        return _rgb_array(dest)

    def close(self):
        self._drop_render_caches()
        super().close()
