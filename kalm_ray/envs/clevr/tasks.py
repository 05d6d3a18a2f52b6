"""CLEVR-Robot goals: task ids, success predicates, distance terms and dense rewards.

Pure numpy, no MuJoCo, so imagined rollouts can be labelled offline. A *state* is the
observation: ball (x, y) in colour order (red, blue, green, purple, cyan), shape ``(10,)``,
metres. ``start`` is the episode's first state (only ``move`` goals read it).

Task ids (directions: ``behind`` = +y, ``left`` = -x, ``front`` = -y, ``right`` = +x):

- train and rephrase, 20 ordered pairs x 4 directions = 80: ``<dir>:<A>:<B>``, e.g.
  ``left:red:blue`` ("red is left of blue"). Holds when the angle of (A - B) is within
  45 deg of ``dir`` and abs(A - B) < 0.39.
- easy, 5 balls x 4 directions = 20: ``move:<A>:<dir>``. Holds when A has moved at least
  0.15 along ``dir`` since the start.
- hard, 92: ``multi:<rel>+<rel>[+<rel>]`` (60 two- and 30 three-relation goals, see
  :func:`generate_hard_tasks`), every relation holds; ``line``, each ball in colour
  order lies within 30 deg of +x from the previous one; ``gather``, the other four balls
  are within 0.325 of green.

Distance term (:func:`distance`, metres, 0 exactly when the goal holds):
relation: ``abs((A - B) - 0.32 * dir)`` (0.32 sits mid-way in the physically possible
ring [0.26, 0.39) of two touching-to-close balls); move: ``0.15 - progress along dir``;
multi: sum over its relations; line: sum over consecutive pairs of how far (A - B) lies
outside the 30 deg cone; gather: sum of ``max(0, abs(ball - green) - 0.30)``.

Dense reward (:func:`reward`): ``(d(state) - d(next_state)) / 0.25 + 1.0 * success(next)``,
i.e. progress in units of one push length (an isolated ball moves ~0.248 per axis push)
plus a bonus on reaching the goal. It is potential-based shaping of the success bonus.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kalm_ray.envs.suite import LEVELS, UnknownChoiceError

COLORS: tuple[str, ...] = ("red", "blue", "green", "purple", "cyan")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "behind": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "front": (0.0, -1.0),
    "right": (1.0, 0.0),
}
"""Unit vector of each direction word, in the table's (x, y) frame."""

RELATION_MAX_DIST = 0.39
"""A relation needs the two centres closer than this (touching balls are 0.26 apart)."""
RELATION_TARGET_DIST = 0.32
"""Centre distance the relation distance term aims for, mid-way in [0.26, 0.39)."""
MOVE_MIN = 0.15
"""A ``move`` goal needs this much progress along its direction (one push gives ~0.25)."""
LEVEL_MAX_STEPS: dict[str, int] = {"easy": 1}
"""Levels whose episodes are shorter than the suite's limit. An easy goal is *one push* (as
in ImagineBench): with 50 pushes a random policy moved the named ball 0.15 on 72.5% of
episodes, so the level measured nothing; with one push it succeeds ~1/5 x 3/8 = 7.5%."""


def level_max_steps(level: str, default: int) -> int:
    """Pushes per episode at ``level``: ``default`` (the suite's limit) unless the level is
    shorter (:data:`LEVEL_MAX_STEPS`)."""
    return min(int(default), LEVEL_MAX_STEPS.get(level, int(default)))


LINE_MAX_ANGLE = math.radians(30.0)
GATHER_RADIUS = 0.325
GATHER_TARGET = 0.30
"""Radius the gather distance term aims for (inside GATHER_RADIUS, so d = 0 implies success)."""
PUSH_LENGTH = 0.25
"""Reward unit: progress of one unobstructed axis push (measured 0.248)."""
SUCCESS_BONUS = 1.0

HARD_SEED = "kalm_ray/clevr/hard/v1"
"""Salt of the stable hash that draws candidate multi-relation goals (see _draw)."""
N_HARD_TWO = 60
N_HARD_THREE = 30

BALL_LIMITS = ((-0.47, 0.47), (-0.17, 0.57))
"""Where the walls keep ball centres (x range, y range), from ENVS_SPEC."""


@dataclass(frozen=True)
class Relation:
    """Ball ``a`` lies ``direction`` of ball ``b`` (indices into COLORS)."""

    direction: str
    a: int
    b: int

    @property
    def id(self) -> str:
        return f"{self.direction}:{COLORS[self.a]}:{COLORS[self.b]}"


@dataclass(frozen=True)
class Move:
    """Ball ``ball`` moves at least MOVE_MIN along ``direction`` from its start."""

    ball: int
    direction: str


@dataclass(frozen=True)
class Multi:
    """All relations at once."""

    relations: tuple[Relation, ...]


@dataclass(frozen=True)
class Line:
    """Balls in colour order, each within 30 degrees of +x from the previous."""


@dataclass(frozen=True)
class Gather:
    """The other four balls within GATHER_RADIUS of the green ball."""


Goal = Relation | Move | Multi | Line | Gather


# ----------------------------------------------------------------------------- task lists


def pairwise_tasks() -> list[str]:
    """The 80 relation ids (train and rephrase), direction-major, then ordered colour pairs."""
    return [f"{d}:{a}:{b}" for d in DIRECTIONS for a in COLORS for b in COLORS if a != b]


def easy_tasks() -> list[str]:
    """The 20 ``move:<ball>:<dir>`` ids, ball-major."""
    return [f"move:{c}:{d}" for c in COLORS for d in DIRECTIONS]


def _canonical(rel: Relation) -> tuple[str, int, int]:
    """``left:a:b`` and ``right:b:a`` are the same goal; map both to one key."""
    opposite = {"behind": "front", "front": "behind", "left": "right", "right": "left"}
    if rel.a < rel.b:
        return (rel.direction, rel.a, rel.b)
    return (opposite[rel.direction], rel.b, rel.a)


def _draw(k: int, i: int, n: int) -> list[int]:
    """The i-th stable pseudo-random draw of k indices < n (sorted, maybe repeated).

    sha256 of a salted counter, not numpy's RNG: the sample must not change with a
    numpy or Python release.
    """
    h = hashlib.sha256(f"{HARD_SEED}:{k}:{i}".encode()).digest()
    return sorted(int.from_bytes(h[4 * j : 4 * j + 4], "big") % n for j in range(k))


def hard_tasks() -> tuple[str, ...]:
    """The 92 hard goals, frozen in :mod:`kalm_ray.envs.clevr.hard_goals`.

    They are :func:`generate_hard_tasks`'s output, stored so that no process pays the
    ~1 s of witness searches; a test checks the two agree.
    """
    from kalm_ray.envs.clevr.hard_goals import HARD_TASKS

    return HARD_TASKS


def generate_hard_tasks() -> tuple[str, ...]:
    """The hard goals: 60 two-relation and 30 three-relation conjunctions, ``line``, ``gather``.

    Conjunctions are drawn from the 80 relations by a salted sha256 counter
    (:func:`_draw`), stable across numpy and Python versions. A draw is kept when its
    parts constrain distinct colour pairs (which rules out direct contradictions such
    as ``left:red:blue`` with ``left:blue:red``), it is not the same goal as one already
    kept (up to ``left:a:b`` == ``right:b:a``), and :func:`witness` finds a table state
    where all its parts hold (this rejects impossible cycles such as A left of B, B left
    of C, C left of A). Parts inside an id follow the order of :func:`pairwise_tasks`.
    """
    rel_ids = pairwise_tasks()
    out: list[str] = []
    for k, n in ((2, N_HARD_TWO), (3, N_HARD_THREE)):
        seen: set[frozenset] = set()
        i = 0
        while len(seen) < n:
            combo = [parse_task(rel_ids[j]) for j in _draw(k, i, len(rel_ids))]
            i += 1
            if len({frozenset((r.a, r.b)) for r in combo}) < k:
                continue
            task = "multi:" + "+".join(r.id for r in combo)
            key = frozenset(_canonical(r) for r in combo)
            if key in seen or witness(task) is None:
                continue
            seen.add(key)
            out.append(task)
    return (*out, "line", "gather")


def tasks(level: str) -> list[str]:
    """All task ids of ``level`` in a stable order; raises UnknownChoiceError."""
    if level in ("train", "rephrase"):
        return pairwise_tasks()
    if level == "easy":
        return easy_tasks()
    if level == "hard":
        return list(hard_tasks())
    raise UnknownChoiceError("level", level, LEVELS)


def _all_task_examples() -> list[str]:
    return pairwise_tasks() + easy_tasks() + ["multi:<rel>+<rel>[+<rel>]", "line", "gather"]


@lru_cache(maxsize=4096)
def parse_task(task: str) -> Goal:
    """Parse a task id (any well-formed id, not only the listed ones); raises UnknownChoiceError."""
    try:
        if task == "line":
            return Line()
        if task == "gather":
            return Gather()
        if task.startswith("multi:"):
            parts = task[len("multi:") :].split("+")
            rels = tuple(parse_task(p) for p in parts)
            if len(rels) < 2 or not all(isinstance(r, Relation) for r in rels):
                raise ValueError(task)
            return Multi(rels)  # type: ignore[arg-type]
        head, first, second = task.split(":")
        if head == "move":
            if second not in DIRECTIONS:
                raise ValueError(task)
            return Move(COLORS.index(first), second)
        if head not in DIRECTIONS or first == second:
            raise ValueError(task)
        return Relation(head, COLORS.index(first), COLORS.index(second))
    except (ValueError, UnknownChoiceError):
        raise UnknownChoiceError("clevr task", task, _all_task_examples()) from None


def parts(task: str) -> list[str]:
    """The training goals whose conjunction is ``task``: a multi-relation goal's relations (each
    a training task id, in the task's order); any other task is its own single part."""
    goal = parse_task(task)
    if isinstance(goal, Multi):
        return [r.id for r in goal.relations]
    return [task]


# ----------------------------------------------------------------------------- predicates


def _xy(state: np.ndarray, i: int) -> np.ndarray:
    return np.asarray(state[2 * i : 2 * i + 2], dtype=np.float64)


def relation_holds(direction: str, offset: np.ndarray) -> bool:
    """Whether ``offset`` = A - B (shape (2,), m) lies in ``direction``'s 90 deg wedge, < 0.39 m."""
    ux, uy = DIRECTIONS[direction]
    along = offset[0] * ux + offset[1] * uy
    across = abs(offset[0] * -uy + offset[1] * ux)
    return bool(along > 0.0 and along >= across and math.hypot(*offset) < RELATION_MAX_DIST)


def _line_part_holds(offset: np.ndarray) -> bool:
    return bool(offset[0] > 0.0 and abs(offset[1]) <= math.tan(LINE_MAX_ANGLE) * offset[0])


def _progress(goal: Move, start: np.ndarray, state: np.ndarray) -> float:
    """How far (m) the ball of a Move goal has gone in its direction since ``start``."""
    return (_xy(state, goal.ball) - _xy(start, goal.ball)) @ np.asarray(DIRECTIONS[goal.direction])


def _offsets(goal: Line | Gather, state: np.ndarray) -> list[np.ndarray]:
    """The (x, y) offsets a Line or Gather goal constrains: each ball from the one before it
    in colour order (Line), each other ball from green (Gather)."""
    if isinstance(goal, Line):
        return [_xy(state, i) - _xy(state, i - 1) for i in range(1, 5)]
    green = _xy(state, COLORS.index("green"))
    return [_xy(state, i) - green for i in range(5) if COLORS[i] != "green"]


def _holds(goal: Goal, start: np.ndarray, state: np.ndarray) -> bool:
    if isinstance(goal, Relation):
        return relation_holds(goal.direction, _xy(state, goal.a) - _xy(state, goal.b))
    if isinstance(goal, Move):
        return bool(_progress(goal, start, state) >= MOVE_MIN)
    if isinstance(goal, Multi):
        return all(_holds(r, start, state) for r in goal.relations)
    parts = _offsets(goal, state)
    if isinstance(goal, Line):
        return all(_line_part_holds(o) for o in parts)
    return all(np.linalg.norm(o) < GATHER_RADIUS for o in parts)


def success(task: str, start: np.ndarray, state: np.ndarray) -> bool:
    """Whether ``task`` holds in ``state`` (10,) given the episode's ``start`` (10,)."""
    return _holds(parse_task(task), start, state)


def _cone_distance(offset: np.ndarray) -> float:
    """Distance (m) from ``offset`` to the cone of directions within 30 deg of +x."""
    norm = math.hypot(*offset)
    excess = abs(math.atan2(offset[1], offset[0])) - LINE_MAX_ANGLE
    if excess <= 0.0:
        return 0.0
    return norm * math.sin(excess) if excess < math.pi / 2 else norm


def _raw_distance(goal: Goal, start: np.ndarray, state: np.ndarray) -> float:
    if isinstance(goal, Relation):
        if _holds(goal, start, state):
            return 0.0
        target = RELATION_TARGET_DIST * np.asarray(DIRECTIONS[goal.direction])
        return float(np.linalg.norm(_xy(state, goal.a) - _xy(state, goal.b) - target))
    if isinstance(goal, Move):
        return float(max(0.0, MOVE_MIN - _progress(goal, start, state)))
    if isinstance(goal, Multi):
        return sum(_raw_distance(r, start, state) for r in goal.relations)
    parts = _offsets(goal, state)
    if isinstance(goal, Line):
        return sum(_cone_distance(o) for o in parts)
    return float(sum(max(0.0, np.linalg.norm(o) - GATHER_TARGET) for o in parts))


def distance(task: str, start: np.ndarray, state: np.ndarray) -> float:
    """Goal distance term (m, >= 0), exactly 0 when ``success`` holds (see module doc)."""
    goal = parse_task(task)
    if _holds(goal, start, state):
        return 0.0
    return _raw_distance(goal, start, state)


def reward(task: str, start: np.ndarray, state: np.ndarray, next_state: np.ndarray) -> float:
    """Dense reward of ``state -> next_state``: progress / PUSH_LENGTH + SUCCESS_BONUS * success."""
    progress = distance(task, start, state) - distance(task, start, next_state)
    bonus = SUCCESS_BONUS if success(task, start, next_state) else 0.0
    return float(progress / PUSH_LENGTH + bonus)


def valid_start(task: str, start: np.ndarray) -> bool:
    """Whether ``start`` makes a meaningful episode: the goal does not hold yet, and a ``move``
    ball has room (>= 0.2 m to the wall-limited range) to move MOVE_MIN along its direction."""
    goal = parse_task(task)
    if _holds(goal, start, start):
        return False
    if isinstance(goal, Move):
        x, y = _xy(start, goal.ball)
        room = {
            "left": x - BALL_LIMITS[0][0],
            "right": BALL_LIMITS[0][1] - x,
            "front": y - BALL_LIMITS[1][0],
            "behind": BALL_LIMITS[1][1] - y,
        }[goal.direction]
        return bool(room >= 0.2)
    return True


# ----------------------------------------------------------------------------- witnesses

_WITNESS_ANGLES = tuple(math.radians(a) for a in (0.0, 25.0, -25.0, 40.0, -40.0))
_WITNESS_RADII = (0.30, 0.36)
_WITNESS_ROOTS = ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.45), (0.0, -0.45), (0.45, 0.4), (-0.45, 0.4))
"""Where a second, unconnected group of related balls may sit relative to the first."""
_MIN_GAP = 0.27  # > 0.26 (touching): witness balls in relation goals never overlap
_TABLE = np.array([[-0.45, 0.45], [-0.15, 0.55]])  # inside the wall-limited range


_GRID = np.stack(
    np.meshgrid(np.linspace(-0.45, 0.45, 19), np.linspace(-0.15, 0.55, 15)), -1
).reshape(-1, 2)


def _fill_free(pos: dict[int, np.ndarray]) -> np.ndarray | None:
    """Centre the placed balls on the table, put the others on free grid points; (10,) or None."""
    pts = np.array(list(pos.values()))
    lo, hi = pts.min(0), pts.max(0)
    if np.any(hi - lo > _TABLE[:, 1] - _TABLE[:, 0]):
        return None
    shift = _TABLE.mean(1) - (lo + hi) / 2
    placed = {i: p + shift for i, p in pos.items()}
    for i in range(5):
        if i in placed:
            continue
        taken = np.array(list(placed.values()))
        gaps = np.linalg.norm(_GRID[:, None, :] - taken[None], axis=-1).min(1)
        free = np.flatnonzero(gaps >= _MIN_GAP)
        if free.size == 0:
            return None
        placed[i] = _GRID[free[0]]
    return np.concatenate([placed[i] for i in range(5)])


def _placement_order(rels: tuple[Relation, ...]) -> list[tuple[Relation | None, int, int]]:
    """BFS over the relation graph: (relation, placed ball, new ball); a None relation starts
    a new unconnected group whose root is placed relative to the first group's root."""
    order: list[tuple[Relation | None, int, int]] = []
    placed: set[int] = set()
    pending = list(rels)
    while pending:
        edge = next((r for r in pending if r.a in placed or r.b in placed), None)
        if edge is None:
            root = pending[0].b
            order.append((None, order[0][1] if order else root, root))
            placed.add(root)
            continue
        pending.remove(edge)
        known, new = (edge.b, edge.a) if edge.b in placed else (edge.a, edge.b)
        if new not in placed:
            order.append((edge, known, new))
            placed.add(new)
    return order


def _relations_witness(rels: tuple[Relation, ...]) -> np.ndarray | None:
    order = _placement_order(rels)
    first_root = order[0][2]
    edge_choices = list(itertools.product(_WITNESS_ANGLES, _WITNESS_RADII))
    choices = [
        [None] if new == first_root else (_WITNESS_ROOTS if rel is None else edge_choices)
        for rel, _, new in order
    ]
    for combo in itertools.product(*choices):
        # Plain floats: this loop runs up to a few thousand times per goal.
        pos: dict[int, tuple[float, float]] = {}
        for (rel, known, new), choice in zip(order, combo, strict=True):
            if new == first_root:
                pos[new] = (0.0, 0.0)
            elif rel is None:
                pos[new] = (pos[known][0] + choice[0], pos[known][1] + choice[1])
            else:
                ang, rad = choice
                ux, uy = DIRECTIONS[rel.direction]
                c, s = math.cos(ang), math.sin(ang)
                sign = rad if new == rel.a else -rad
                ox, oy = sign * (c * ux - s * uy), sign * (s * ux + c * uy)
                pos[new] = (pos[known][0] + ox, pos[known][1] + oy)
        pts = list(pos.values())
        if any(
            math.hypot(p[0] - q[0], p[1] - q[1]) < _MIN_GAP
            for p, q in itertools.combinations(pts, 2)
        ):
            continue
        # Relations only see differences, so check them before placing on the table.
        if not all(relation_holds(r.direction, np.subtract(pos[r.a], pos[r.b])) for r in rels):
            continue
        full = _fill_free({i: np.array(p) for i, p in pos.items()})
        if full is not None:
            return full
    return None


def witness(task: str) -> np.ndarray | None:
    """A state (10,) where ``task`` holds with non-overlapping balls inside the walls, or None.

    Relation goals get balls >= 0.27 apart; ``line`` has to use nearly touching balls
    (>= 0.26), since five balls within 30 deg of each other span almost the whole table.
    For ``move`` goals it is a goal state for the start :func:`witness_start`. Used to vet
    hard goals and by tests.
    """
    goal = parse_task(task)
    if isinstance(goal, Relation):
        return _relations_witness((goal,))
    if isinstance(goal, Multi):
        return _relations_witness(goal.relations)
    if isinstance(goal, Move):
        state = witness_start(task).copy()
        state[2 * goal.ball : 2 * goal.ball + 2] += 0.2 * np.asarray(DIRECTIONS[goal.direction])
        return state
    if isinstance(goal, Line):
        # A zigzag: steps of (0.23, +-0.13) are 0.264 long at 29.5 deg from +x.
        xs = np.linspace(-0.46, 0.46, 5)
        ys = np.array([0.1, 0.23, 0.1, 0.23, 0.1])
        return np.stack([xs, ys], 1).ravel()
    green = np.array([0.0, 0.2])
    ring = iter([(0.29, 0.0), (0.0, 0.29), (-0.29, 0.0), (0.0, -0.29)])
    return np.concatenate([green if c == "green" else green + next(ring) for c in COLORS])


def witness_start(task: str) -> np.ndarray:
    """A start state for a ``move`` goal: its ball mid-table, the others in the corners."""
    goal = parse_task(task)
    ball = goal.ball if isinstance(goal, Move) else 0
    corners = iter([(-0.42, -0.12), (0.42, -0.12), (-0.42, 0.52), (0.42, 0.52)])
    return np.concatenate(
        [np.array([0.0, 0.2]) if i == ball else np.array(next(corners)) for i in range(5)]
    )
