"""Paraphrased captions of a `ClipSpec`: what happens, to which object, in which order.

Every caption names each event's object by colour and shape as it is when the event starts
(sometimes with its size or position), the action with a synonym ('moves left', 'slides to the
left', 'moves from the top right to the top'), and, for two events, their order in one of
several sentence shapes, some of which mention the later event first ('the blue square grows
after the red circle moves left'). A model that ignores time cannot tell a clip's captions from
those of its reversal.
"""

from __future__ import annotations

import numpy as np

from vlpt.data.synthetic.captions import (
    BACKGROUND_WORDS,
    POSITION_NOUNS,
    SIZE_WORDS,
    pick,
    position_phrase,
    with_article,
)
from vlpt.data.synthetic.events import MOVES, ClipSpec, ClipState, Event
from vlpt.data.synthetic.world import ObjectSpec

DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "moves left": ("left", "to the left", "leftwards"),
    "moves right": ("right", "to the right", "rightwards"),
    "moves up": ("up", "upwards"),
    "moves down": ("down", "downwards"),
    "moves up and left": ("up and to the left", "diagonally up and left", "up and left"),
    "moves up and right": ("up and to the right", "diagonally up and right", "up and right"),
    "moves down and left": ("down and to the left", "diagonally down and left", "down and left"),
    "moves down and right": (
        "down and to the right",
        "diagonally down and right",
        "down and right",
    ),
}
MOVE_VERBS = ("moves", "slides", "goes", "travels", "glides")

VERB_PHRASES: dict[str, tuple[str, ...]] = {
    "grows": ("grows", "gets bigger", "becomes larger", "grows larger", "expands"),
    "shrinks": ("shrinks", "gets smaller", "becomes smaller", "shrinks down"),
    "rotates clockwise": ("rotates clockwise", "spins clockwise", "turns clockwise"),
    "rotates anticlockwise": (
        "rotates anticlockwise",
        "rotates counterclockwise",
        "spins counter-clockwise",
        "turns anticlockwise",
    ),
    "appears": ("appears", "fades in", "shows up", "comes into view"),
    "disappears": ("disappears", "fades out", "vanishes", "fades away"),
}

OPENINGS = ("", "", "", "in this video, ", "in this clip ", "a clip in which ", "a video where ")

# Two-event sentence shapes; {a} happens first, {b} second. `pronoun`: {b} may call an object
# already named in {a} 'it'.
SEQUENCES: tuple[tuple[str, bool], ...] = (
    ("{a}, then {b}", True),
    ("first {a}, then {b}", True),
    ("{a} and then {b}", True),
    ("{a}; after that {b}", True),
    ("{b} after {a}", False),
    ("before {b}, {a}", False),
)


def make_clip_captions(clip: ClipSpec, n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct captions of `clip` (fewer only if the templates run out)."""
    captions: list[str] = []
    for _ in range(8 * n):
        if len(captions) == n:
            break
        text = pick(rng, OPENINGS) + events_sentence(clip, rng)
        text += still_objects_phrase(clip, rng) if rng.uniform() < 0.25 else ""
        if rng.uniform() < 0.25:
            word = with_article(pick(rng, BACKGROUND_WORDS[clip.background.kind]))
            text += f" on {word} background"
        if text not in captions:
            captions.append(text)
    return captions


def events_sentence(clip: ClipSpec, rng: np.random.Generator) -> str:
    """'the red circle moves left', 'first the red circle slides left, then it grows'."""
    states = clip.states()
    if len(clip.events) == 1:
        return clause(clip.events[0], states[0], rng)
    template, pronoun_ok = SEQUENCES[rng.integers(len(SEQUENCES))]
    first, second = clip.events
    same = first.obj == second.obj and second.action != "appears"
    a = clause(first, states[0], rng)
    b = clause(second, states[1], rng, pronoun=pronoun_ok and same and rng.uniform() < 0.5)
    return template.format(a=a, b=b)


def clause(event: Event, state: ClipState, rng: np.random.Generator, pronoun: bool = False) -> str:
    """'the small red circle at the top moves left', 'a blue star appears in the middle'."""
    o = state.objects[event.obj]
    if event.action == "appears":  # new to the viewer: indefinite, and say where
        subject = with_article(_bare(o, rng)) + " " + pick(rng, VERB_PHRASES["appears"])
        return subject + (" " + position_phrase(o, rng) if rng.uniform() < 0.5 else "")
    subject = "it" if pronoun else "the " + _bare(o, rng)
    if not pronoun and rng.uniform() < 0.25:
        subject += " " + position_phrase(o, rng)
    return f"{subject} {verb_phrase(event, state, rng)}"


def verb_phrase(event: Event, state: ClipState, rng: np.random.Generator) -> str:
    """'moves left', 'slides from the top right to the top', 'turns blue', 'grows'."""
    action = event.action
    if action in MOVES:
        verb = pick(rng, MOVE_VERBS)
        if rng.uniform() < 0.2:
            before = state.objects[event.obj]
            after = event.apply(state).objects[event.obj]
            return f"{verb} from the {_place(before, rng)} to the {_place(after, rng)}"
        return f"{verb} {pick(rng, DIRECTION_WORDS[action])}"
    if event.colours is not None:
        old, new = event.colours
        return pick(
            rng,
            (
                f"turns {new}",
                f"changes from {old} to {new}",
                f"changes colour to {new}",
                f"goes from {old} to {new}",
                f"becomes {new}",
            ),
        )
    return pick(rng, VERB_PHRASES[action])


def still_objects_phrase(clip: ClipSpec, rng: np.random.Generator) -> str:
    """', while a green star stays still' for an object that is visible and idle all along."""
    busy = {e.obj for e in clip.events}
    idle = [
        o
        for i, (o, visible) in enumerate(zip(clip.start.objects, clip.start.visible))
        if visible and i not in busy
    ]
    if not idle:
        return ""
    o = idle[rng.integers(len(idle))]
    rest = pick(rng, ("stays still", "does not move", "stays where it is"))
    return f", while {with_article(_bare(o, rng))} {rest}"


def _place(o: ObjectSpec, rng: np.random.Generator) -> str:
    """A cell name that cannot be read as a direction: 'middle right', never bare 'right'
    ('moves from the top right to the right' would say the wrong thing)."""
    names = [n for n in POSITION_NOUNS[o.position] if n not in ("left", "right", "top", "bottom")]
    return pick(rng, tuple(names))


def _bare(o: ObjectSpec, rng: np.random.Generator) -> str:
    """'red circle' or, half the time, 'small red circle'."""
    size = pick(rng, SIZE_WORDS[o.size]) + " " if rng.uniform() < 0.5 else ""
    return f"{size}{o.colour} {o.shape}"
