"""The video world as pure data: actions, events, clips, their time reversal and animation.

A clip is a `SceneSpec`-like start state (objects, which of them are visible) plus one or two
`Event`s that happen one after the other. As for images, two descriptions are kept apart:

- `ClipSpec` is *discrete*: what captions and metadata talk about ("the red circle moves left,
  then the blue square grows").
- `animate` turns it into *continuous* `Scene`s, one per frame time, which `render_clip` draws
  with the same sprite renderer as the still images.

Every clip has a time-reversed twin, `ClipSpec.reversed()`, that starts where the clip ends and
undoes its events in reverse order ("the blue square shrinks, then the red circle moves right").
`animate(clip.reversed(), end, 1 - t)` equals `animate(clip, start, t)`, so the reversed twin is
exactly the clip played backwards, and its captions are the correct captions of that reversal.
Clips whose reversal would be described by the same events (an event followed by its own
inverse: "moves left, then moves right") are never sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from vlpt.data.synthetic import world
from vlpt.data.synthetic.world import COLOUR_RGB, RGB, SIZE_SCALE, Background, ObjectSpec, Scene

MOVES: dict[str, tuple[int, int]] = {
    "moves left": (0, -1),
    "moves right": (0, 1),
    "moves up": (-1, 0),
    "moves down": (1, 0),
    "moves up and left": (-1, -1),
    "moves up and right": (-1, 1),
    "moves down and left": (1, -1),
    "moves down and right": (1, 1),
}
"""Motion actions and the grid step (rows, columns) each one makes; up is row - 1."""

ACTIONS: tuple[str, ...] = (
    *MOVES,
    "grows",
    "shrinks",
    "rotates clockwise",
    "rotates anticlockwise",
    "changes colour",
    "appears",
    "disappears",
)
"""Every action label of the video world, the vocabulary of `KEY.json["actions"]`."""

REVERSE_ACTION: dict[str, str] = {
    "moves left": "moves right",
    "moves right": "moves left",
    "moves up": "moves down",
    "moves down": "moves up",
    "moves up and left": "moves down and right",
    "moves down and right": "moves up and left",
    "moves up and right": "moves down and left",
    "moves down and left": "moves up and right",
    "grows": "shrinks",
    "shrinks": "grows",
    "rotates clockwise": "rotates anticlockwise",
    "rotates anticlockwise": "rotates clockwise",
    # The label is its own reverse; the event's colours swap (red -> blue becomes blue -> red).
    "changes colour": "changes colour",
    "appears": "disappears",
    "disappears": "appears",
}
"""The action seen when a clip is played backwards."""

# Relative chances of the kinds of event; motion has 8 directions, so it comes up more often.
EVENT_KINDS: dict[str, float] = {"move": 2, "size": 1, "rotate": 1, "colour": 1, "visibility": 1}

EVENT_WINDOWS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.1, 0.9),),
    2: ((0.05, 0.45), (0.55, 0.95)),
}
"""When each event happens, as fractions of the clip (0 = first frame, 1 = last frame). The
windows are symmetric under t -> 1 - t, which makes a reversed clip the clip played backwards."""

ROTATION_DEGREES = 90.0
"""How far a rotation turns; small steps between sampled frames keep the direction visible even
for shapes that look the same after a quarter turn."""


def reverse_action(action: str) -> str:
    """The action of the reversed clip: 'moves left' -> 'moves right', 'grows' -> 'shrinks'."""
    return REVERSE_ACTION[action]


@dataclass(frozen=True)
class Event:
    """One thing that happens to object `obj` (an index into the clip's objects)."""

    action: str
    obj: int
    colours: tuple[str, str] | None = None
    """(before, after) for 'changes colour'; None for every other action."""

    def reversed(self) -> Event:
        colours = None if self.colours is None else (self.colours[1], self.colours[0])
        return Event(reverse_action(self.action), self.obj, colours)

    def apply(self, state: ClipState) -> ClipState:
        """The discrete state after this event."""
        o = state.objects[self.obj]
        visible = list(state.visible)
        if self.action in MOVES:
            dr, dc = MOVES[self.action]
            o = replace(o, row=o.row + dr, col=o.col + dc)
        elif self.action in ("grows", "shrinks"):
            o = replace(o, size="large" if self.action == "grows" else "small")
        elif self.colours is not None:
            o = replace(o, colour=self.colours[1])
        elif self.action in ("appears", "disappears"):
            visible[self.obj] = self.action == "appears"
        objects = (*state.objects[: self.obj], o, *state.objects[self.obj + 1 :])
        return ClipState(objects, tuple(visible))


@dataclass(frozen=True)
class ClipState:
    """The discrete state of a clip at one moment: every object (visible or not) and its cell."""

    objects: tuple[ObjectSpec, ...]
    visible: tuple[bool, ...]


@dataclass(frozen=True)
class ClipSpec:
    """A sampled clip: background, the start state, and 1-2 events in order."""

    background: Background
    start: ClipState
    events: tuple[Event, ...]

    def states(self) -> list[ClipState]:
        """The state before the first event, between events, and after the last."""
        states = [self.start]
        for event in self.events:
            states.append(event.apply(states[-1]))
        return states

    def reversed(self) -> ClipSpec:
        """The clip played backwards: it starts in the end state and undoes the events."""
        events = tuple(e.reversed() for e in reversed(self.events))
        return ClipSpec(self.background, self.states()[-1], events)

    @property
    def actions(self) -> list[str]:
        return [e.action for e in self.events]

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        return EVENT_WINDOWS[len(self.events)]


def sample_clip(
    rng: np.random.Generator,
    *,
    held_out: tuple[tuple[str, str], ...],
    require_held_out: bool,
    max_events: int = 2,
) -> ClipSpec:
    """A scene of the image world (same objects, cells and held-out rule) with 1..max_events events.

    Train and val clips never show a held-out colour-shape pair, not even after a colour change;
    test clips start with at least one.
    """
    spec = world.sample_scene(rng, held_out=held_out, require_held_out=require_held_out)
    n_events = int(rng.integers(1, max_events + 1))
    state = ClipState(spec.objects, (True,) * len(spec.objects))
    start = state
    events: list[Event] = []
    for _ in range(n_events):
        event = _sample_event(rng, state, events, held_out if not require_held_out else ())
        if event is None:  # e.g. the only object has disappeared: one event it is
            break
        if not events and event.action == "appears":
            # An object that appears first is hidden at the start.
            hidden = list(state.visible)
            hidden[event.obj] = False
            start = state = ClipState(state.objects, tuple(hidden))
        events.append(event)
        state = event.apply(state)
    return ClipSpec(spec.background, start, tuple(events))


def _sample_event(
    rng: np.random.Generator,
    state: ClipState,
    earlier: list[Event],
    forbidden_pairs: tuple[tuple[str, str], ...],
) -> Event | None:
    """A random event that can happen in `state` and does not undo the previous event; None when
    there is none (the only object has just disappeared)."""
    kinds = list(EVENT_KINDS)
    weights = np.array(list(EVENT_KINDS.values()))
    for _ in range(100):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        obj = int(rng.integers(len(state.objects)))
        event = _event_of_kind(kind, obj, rng, state, first=not earlier, forbidden=forbidden_pairs)
        if event is not None and not (earlier and event == earlier[-1].reversed()):
            return event
    return None


def _event_of_kind(
    kind: str,
    obj: int,
    rng: np.random.Generator,
    state: ClipState,
    *,
    first: bool,
    forbidden: tuple[tuple[str, str], ...],
) -> Event | None:
    """An event of `kind` for object `obj`, or None when none fits the state."""
    o = state.objects[obj]
    if kind == "visibility":
        if first:  # the start state is still open: the object may be hidden at first
            return Event("appears" if rng.uniform() < 0.5 else "disappears", obj)
        return Event("disappears" if state.visible[obj] else "appears", obj)
    if not state.visible[obj]:
        return None
    if kind == "move":
        taken = {(p.row, p.col) for i, p in enumerate(state.objects) if i != obj}
        options = [
            action
            for action, (dr, dc) in MOVES.items()
            if 0 <= o.row + dr < 3 and 0 <= o.col + dc < 3 and (o.row + dr, o.col + dc) not in taken
        ]
        return Event(options[rng.integers(len(options))], obj) if options else None
    if kind == "size":
        return Event("shrinks" if o.size == "large" else "grows", obj)
    if kind == "rotate":
        if o.shape == "circle":  # a turning circle looks still
            return None
        return Event("rotates clockwise" if rng.uniform() < 0.5 else "rotates anticlockwise", obj)
    # colour: the new pair must stay unique in the clip and allowed in this split
    pairs = {p.pair for i, p in enumerate(state.objects) if i != obj}
    options = [
        c
        for c in world.COLOURS
        if c != o.colour and (c, o.shape) not in pairs and (c, o.shape) not in forbidden
    ]
    if not options:
        return None
    return Event("changes colour", obj, (o.colour, options[rng.integers(len(options))]))


# ---------------------------------------------------------------------------------------------
# Animation


def start_scene(clip: ClipSpec, rng: np.random.Generator) -> Scene:
    """The sprites at t = 0: each object at its cell centre with the image world's jitter and
    tilt, hidden objects at opacity 0."""
    scene = world.SceneSpec(clip.background, clip.start.objects).to_scene(rng)
    sprites = tuple(
        s if visible else replace(s, opacity=0.0)
        for s, visible in zip(scene.sprites, clip.start.visible)
    )
    return Scene(clip.background, sprites)


def animate(clip: ClipSpec, start: Scene, times: Sequence[float]) -> list[Scene]:
    """The scene at each time t in [0, 1] (0 = first frame), starting from the sprites `start`.

    Events run one after the other in their windows (`ClipSpec.windows`); an event changes its
    object's sprite smoothly from the state the previous events left it in.
    """
    scenes = []
    for t in times:
        sprites = list(start.sprites)
        for event, (t0, t1) in zip(clip.events, clip.windows):
            progress = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
            if progress == 0.0:
                break
            sprites[event.obj] = _animate_sprite(event, sprites[event.obj], progress)
        scenes.append(Scene(start.background, tuple(sprites)))
    return scenes


def _animate_sprite(event: Event, s: world.Sprite, p: float) -> world.Sprite:
    """Sprite `s` (as the event starts) a fraction `p` of the way through `event`."""
    action = event.action
    if action in MOVES:
        dr, dc = MOVES[action]
        return replace(s, x=s.x + dc * p / 3, y=s.y + dr * p / 3)
    if action in ("grows", "shrinks"):
        step = SIZE_SCALE["large"] - SIZE_SCALE["small"]
        return replace(s, scale=s.scale + (step if action == "grows" else -step) * p)
    if action in ("rotates clockwise", "rotates anticlockwise"):
        # Sprite angles are counter-clockwise.
        sign = -1.0 if action == "rotates clockwise" else 1.0
        return replace(s, angle=s.angle + sign * ROTATION_DEGREES * p)
    if event.colours is not None:
        # A quick blend in the middle of the window: a slow one would pass through other named
        # colours (red -> blue through purple).
        w = min(max((p - 0.4) / 0.2, 0.0), 1.0)
        return replace(s, rgb=_mix(COLOUR_RGB[event.colours[0]], COLOUR_RGB[event.colours[1]], w))
    return replace(s, opacity=p if action == "appears" else 1.0 - p)


def _mix(a: RGB, b: RGB, w: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * w),
        round(a[1] + (b[1] - a[1]) * w),
        round(a[2] + (b[2] - a[2]) * w),
    )
