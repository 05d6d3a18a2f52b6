"""The dataset card: per-task episode counts, lengths and success rates of a collected dataset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TaskStats:
    """What was collected for one task."""

    task: str
    episodes: int = 0
    env_steps: int = 0
    successes: int = 0

    @property
    def mean_length(self) -> float:
        return self.env_steps / self.episodes if self.episodes else 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "episodes": self.episodes,
            "env_steps": self.env_steps,
            "successes": self.successes,
            "mean_length": round(self.mean_length, 3),
            "success_rate": round(self.success_rate, 4),
        }


def total(stats: list[TaskStats]) -> TaskStats:
    """All tasks together."""
    return TaskStats(
        task="all",
        episodes=sum(s.episodes for s in stats),
        env_steps=sum(s.env_steps for s in stats),
        successes=sum(s.successes for s in stats),
    )


def _row(s: TaskStats) -> str:
    return f"| {s.task} | {s.episodes} | {s.mean_length:.1f} | {s.success_rate:.1%} |"


def card_table(stats: list[TaskStats], *, limit: int | None = None) -> str:
    """A Markdown table (task, episodes, mean length, success rate) with a total row.

    With ``limit``, only the ``limit`` tasks of lowest success rate are listed (for a
    terminal; the README has them all).
    """
    shown = (
        stats
        if limit is None or len(stats) <= limit
        else sorted(stats, key=lambda s: (s.success_rate, s.task))[:limit]
    )
    lines = ["| task | episodes | mean length | success rate |", "|---|---:|---:|---:|"]
    lines += [_row(s) for s in shown]
    if len(shown) < len(stats):
        lines.append(f"| ... {len(stats) - len(shown)} more tasks | | | |")
    lines.append(_row(total(stats)).replace("| all |", "| **all** |"))
    return "\n".join(lines)


def dataset_card(stats: list[TaskStats], *, env: str, policy: str, facts: dict[str, str]) -> str:
    """The README.md written beside the episodes."""
    t = total(stats)
    head = [
        f"# Real {env} episodes",
        "",
        f"{t.episodes} episodes, {t.env_steps} transitions, {len(stats)} train tasks, "
        f"success rate {t.success_rate:.1%}. Behaviour policy: {policy}.",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
    ]
    return "\n".join(head) + "\n" + card_table(stats) + "\n"
