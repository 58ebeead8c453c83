"""Attribute accuracy of clip captions in the synthetic video world: who does what.

    accuracy = clip_attribute_accuracy("the red circle moves left, then it grows", meta)

A clip's caption tells its events ('the small red circle at the top moves left', 'then it
grows'); an event is told correctly when a clause names its object as it is when the event
starts (colour + shape; size and position where given) together with the action. Actions are
read with the synonyms the caption generator uses ('slides to the left', 'gets bigger', 'spins
counter-clockwise', 'goes from the top right to the top', 'turns blue'), taken from
`vlpt.data.synthetic.video_captions`, so every reference caption scores 1 (a test checks it).
Objects that only stand still are not scored. The object parsing is the image metric's
(`vlpt.eval.caption_metrics`); a clause without an object ('then it grows') is about the
object of the clause before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vlpt.data.synthetic import world
from vlpt.data.synthetic.events import MOVES
from vlpt.data.synthetic.video_captions import DIRECTION_WORDS, MOVE_VERBS, VERB_PHRASES
from vlpt.eval.caption_metrics import (
    SYNTHETIC_IMAGE_VOCAB,
    AttributeVocab,
    _clauses,
    _objects_in,
    _positions_in,
)

Words = tuple[str, ...]


def _words(phrase: str) -> Words:
    return tuple(re.findall(r"[^\W\d_]+", phrase))  # as `_clauses` cuts them: 'counter-clockwise'


@dataclass(frozen=True)
class ActionVocab:
    """The words `clip_attribute_accuracy` understands: objects, plus how actions are said."""

    objects: AttributeVocab
    phrases: Mapping[str, tuple[Words, ...]]
    """Action -> verb phrases that say it ('grows' -> 'gets bigger', ...)."""
    move_verbs: tuple[str, ...]
    """Verbs of motion, followed by a direction or by 'from the P to the Q'."""
    directions: Mapping[str, tuple[Words, ...]]
    """Motion action -> direction phrases ('moves left' -> 'to the left', 'leftwards')."""
    steps: Mapping[str, tuple[int, int]]
    """Motion action -> grid step (rows, columns), to read 'from the P to the Q'."""
    colour_verbs: tuple[str, ...] = ("turns", "becomes", "changes", "goes")
    """Verbs of a colour change when a colour follows them ('turns blue', 'goes from red to blue')."""


SYNTHETIC_VIDEO_VOCAB = ActionVocab(
    objects=replace(
        SYNTHETIC_IMAGE_VOCAB,
        relation_heads=("above", "below", "up", "down"),  # 'moves up and to the left'
        clause_breaks=("then", "after", "before", "while"),
    ),
    phrases={action: tuple(map(_words, ps)) for action, ps in VERB_PHRASES.items()},
    move_verbs=MOVE_VERBS,
    directions={action: tuple(map(_words, ps)) for action, ps in DIRECTION_WORDS.items()},
    steps=MOVES,
)


@dataclass(frozen=True)
class EventMention:
    """An event as a caption tells it (or as the metadata says it happened).

    `action` is an action label ('moves left'); a colour change carries its new colour
    ('changes colour to blue'). Size and position are None where the caption gives none."""

    colour: str | None
    shape: str
    action: str | None
    size: str | None = None
    position: str | None = None


def clip_attribute_accuracy(
    prediction: str, meta: Mapping[str, Any], vocab: ActionVocab = SYNTHETIC_VIDEO_VOCAB
) -> float:
    """Fraction of the clip's events the caption tells correctly, penalising invented ones.

    The events are `meta["events"]` (`action`, `object`, `to`, as the synthetic video shards'
    `.json` holds), about the objects of `meta["objects"]` (the start state). An event told
    with a wrong size or position is missed; each distinct (colour, shape, action) the caption
    tells that is no event's adds one to the denominator:

        accuracy = correct events / (events + invented events)

    The order of the events is not scored (`vlpt eval temporal` measures that).
    """
    events = expected_events(meta)
    mentions = parse_event_mentions(prediction, vocab)
    correct = sum(any(_tells(m, e) for m in mentions) for e in events)
    told = {(m.colour, m.shape, m.action) for m in mentions if m.action and m.colour}
    invented = told - {(e.colour, e.shape, e.action) for e in events}
    return correct / (len(events) + len(invented))


def _tells(mention: EventMention, event: EventMention) -> bool:
    return (
        (mention.colour, mention.shape, mention.action) == (event.colour, event.shape, event.action)
        and mention.size in (None, event.size)
        and mention.position in (None, event.position)
    )


def expected_events(meta: Mapping[str, Any]) -> list[EventMention]:
    """The events of a clip's metadata, each with its object as it is when the event starts."""
    events = meta.get("events") or []
    if not events or not meta.get("objects"):
        raise ValueError(f"clip {meta.get('key', '?')!r} has no 'events' and 'objects' metadata.")
    objects = [dict(o) for o in meta["objects"]]
    expected = []
    for event in events:
        o, action = objects[event["object"]], event["action"]
        label = f"changes colour to {event['to']}" if action == "changes colour" else action
        expected.append(EventMention(o["colour"], o["shape"], label, o["size"], o["position"]))
        if action in MOVES:  # the object as the next event finds it
            o["position"] = event["to"]
        elif action in ("grows", "shrinks"):
            o["size"] = event["to"]
        elif action == "changes colour":
            o["colour"] = event["to"]
    return expected


def parse_event_mentions(
    caption: str, vocab: ActionVocab = SYNTHETIC_VIDEO_VOCAB
) -> list[EventMention]:
    """Every object a caption names, with the action its clause tells (None if none).

    The first object of a clause is the subject of its action; a clause with an action and no
    object continues the previous clause's object (with its new colour after a colour change).
    """
    mentions: list[EventMention] = []
    for clause in _clauses(caption.lower(), vocab.objects):
        action, rest = _action_in(clause, vocab)
        found = _objects_in(rest, vocab.objects)
        positions = _positions_in(rest, vocab.objects)
        if action is not None and action[1] is not None:  # 'from the P to the Q' gives P
            positions = [action[1]]
        label = action[0] if action is not None else None
        if found:
            position = positions[0] if len(found) == 1 and len(set(positions)) == 1 else None
            (colour, shape, size), others = found[0], found[1:]
            mentions.append(EventMention(colour, shape, label, size, position))
            mentions += [EventMention(c, s, None, z) for c, s, z in others]
        elif label is not None and mentions:  # 'then it grows'
            before = mentions[-1]
            colour = _new_colour(before.action) or before.colour
            mentions.append(EventMention(colour, before.shape, label))
    return mentions


def _new_colour(action: str | None) -> str | None:
    prefix = "changes colour to "
    return action[len(prefix) :] if action and action.startswith(prefix) else None


Action = tuple[str, str | None]
"""An action label and, for 'moves from the P to the Q', the start position P."""


def _action_in(words: list[str], vocab: ActionVocab) -> tuple[Action | None, list[str]]:
    """The first action a clause tells, and the clause's words without the action's phrase."""
    for i in range(len(words)):
        found = _action_at(words, i, vocab)
        if found is not None:
            action, end = found
            return action, words[:i] + words[end:]
    return None, words


def _action_at(words: list[str], i: int, vocab: ActionVocab) -> tuple[Action, int] | None:
    """The action whose phrase starts at word i, and where the phrase ends."""
    said = _longest_at(words, i, vocab.phrases)  # 'grows larger' rather than 'grows'
    if said is not None:
        return (said[1], None), i + said[0]
    if words[i] in vocab.move_verbs:
        found = _direction_at(words, i + 1, vocab)
        if found is not None:
            return found
    if words[i] in vocab.colour_verbs:
        colours = [w for w in words[i + 1 :] if w in vocab.objects.colours]
        if colours:  # the new colour is the last one: 'changes from red to blue'
            return (f"changes colour to {colours[-1]}", None), len(words)
    return None


def _direction_at(words: list[str], i: int, vocab: ActionVocab) -> tuple[Action, int] | None:
    """A direction phrase at word i ('diagonally up and left'), or 'from the P to the Q'."""
    if words[i : i + 1] == ["from"]:
        positions = _positions_in(words[i + 1 :], vocab.objects)
        if len(positions) == 2:
            start, end = (divmod(world.POSITIONS.index(p), 3) for p in positions)
            step = (_sign(end[0] - start[0]), _sign(end[1] - start[1]))
            action = next((a for a, s in vocab.steps.items() if s == step), None)
            return ((action, positions[0]), len(words)) if action else None
    if words[i : i + 1] == ["diagonally"]:
        i += 1
    said = _longest_at(words, i, vocab.directions)  # 'up and to the left', not 'up'
    return None if said is None else ((said[1], None), i + said[0])


def _longest_at(
    words: list[str], i: int, phrases: Mapping[str, tuple[Words, ...]]
) -> tuple[int, str] | None:
    """(length, label) of the longest phrase starting at word i, if any."""
    matches = [
        (len(phrase), label)
        for label, options in phrases.items()
        for phrase in options
        if tuple(words[i : i + len(phrase)]) == phrase
    ]
    return max(matches) if matches else None


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)
