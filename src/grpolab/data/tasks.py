"""Synthetic tasks: seeded problems with a checkable answer and a worked completion.

A completion has the shape `<think>…</think><answer>…</answer>`. The think section of an
arithmetic problem works column by column from the right, the way a person adds on paper,
so a tiny model can learn it and RL has a trace whose mistakes it can fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    completion: str


def arithmetic_problem(a: int, op: str, b: int) -> Problem:
    """`a op b` with its column-by-column worked solution (for `-`, a >= b)."""
    if op not in ("+", "-"):
        raise ValueError(f"unknown operation {op!r}")
    if op == "-" and a < b:
        raise ValueError("subtraction problems keep a >= b")
    result = a + b if op == "+" else a - b
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        column = x + y + carry if op == "+" else x - y - carry
        steps.append(f"{x}{op}{y}{op}{carry}={column}")
        carry = column // 10 if op == "+" else int(column < 0)
    think = " ".join(steps)
    return Problem(prompt=f"{a}{op}{b}=", answer=str(result), completion=f"<think>{think}</think><answer>{result}</answer>")


def generate_arithmetic(n: int, max_operand: int, operations: list[str], rng: random.Random, exclude: set[str]) -> list[Problem]:
    """`n` distinct problems whose prompts are not in `exclude` (which grows with them)."""
    pairs = {"+": (max_operand + 1) ** 2, "-": (max_operand + 1) * (max_operand + 2) // 2}
    space = sum(pairs[op] for op in set(operations))
    if n > space - len(exclude):
        raise ValueError(f"cannot draw {n} distinct problems with max_operand={max_operand}")
    problems = []
    while len(problems) < n:
        op = rng.choice(operations)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        problem = arithmetic_problem(a, op, b)
        if problem.prompt in exclude:
            continue
        exclude.add(problem.prompt)
        problems.append(problem)
    return problems
