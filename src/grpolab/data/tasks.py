"""Synthetic tasks: seeded problems with a checkable answer and a worked completion.

A completion has the shape `<think>…</think><answer>…</answer>`. The think section of an
arithmetic problem works column by column from the right, the way a person adds on paper,
so a tiny model can learn it and RL has a trace whose mistakes it can fix.

A sloppy demonstration forgets every carry (borrow): each column is worked with a carry of 0
and the answer is read off those columns. SFT on a share of them gives the base model a
systematic error that sampling sometimes avoids, which is what GRPO learns from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    completion: str


def arithmetic_problem(a: int, op: str, b: int, sloppy: bool = False) -> Problem:
    """`a op b` with its column-by-column worked solution (for `-`, a >= b).

    `sloppy`: the completion forgets every carry (borrow), so its answer is wrong whenever one
    was needed; `answer` is always the true result."""
    if op not in ("+", "-"):
        raise ValueError(f"unknown operation {op!r}")
    if op == "-" and a < b:
        raise ValueError("subtraction problems keep a >= b")
    result = a + b if op == "+" else a - b
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    width = max(len(da), len(db))
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        column = x + y + carry if op == "+" else x - y - carry
        steps.append(f"{x}{op}{y}{op}{carry}={column}")
        digits.append(str(column) if i == width - 1 and column > 0 else str(column % 10))
        carry = 0 if sloppy else (column // 10 if op == "+" else int(column < 0))
    think = " ".join(steps)
    written = str(int("".join(reversed(digits)))) if sloppy else str(result)
    return Problem(prompt=f"{a}{op}{b}=", answer=str(result), completion=f"<think>{think}</think><answer>{written}</answer>")


def problem_space(max_operand: int, operations: list[str]) -> int:
    """How many distinct problems the operations draw from (`-` keeps a >= b)."""
    pairs = {"+": (max_operand + 1) ** 2, "-": (max_operand + 1) * (max_operand + 2) // 2}
    return sum(pairs[op] for op in set(operations))


def generate_arithmetic(
    n: int, max_operand: int, operations: list[str], rng: random.Random, exclude: set[str], sloppy_rate: float = 0.0
) -> list[Problem]:
    """`n` distinct problems whose prompts are not in `exclude` (which grows with them); a
    `sloppy_rate` share of them, drawn at random, carry a sloppy completion."""
    space = problem_space(max_operand, operations)
    if n > space - len(exclude):
        raise ValueError(f"cannot draw {n} distinct problems with max_operand={max_operand}")
    problems = []
    while len(problems) < n:
        op = rng.choice(operations)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        problem = arithmetic_problem(a, op, b, sloppy=sloppy_rate > 0 and rng.random() < sloppy_rate)
        if problem.prompt in exclude:
            continue
        exclude.add(problem.prompt)
        problems.append(problem)
    return problems
