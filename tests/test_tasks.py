import random

import pytest

from grpolab.data.tasks import arithmetic_problem, generate_arithmetic
from grpolab.rewards import REWARDS, answer_match, extract_answer, format_reward


def test_addition_trace_carries_column_by_column():
    p = arithmetic_problem(347, "+", 285)
    assert p.prompt == "347+285="
    assert p.answer == "632"
    # 7+5=12 -> digit 2 carry 1; 4+8+1=13 -> 3 carry 1; 3+2+1=6
    assert p.completion == "<think>7+5+0=12 4+8+1=13 3+2+1=6</think><answer>632</answer>"


def test_subtraction_trace_borrows_and_pads_the_shorter_operand():
    p = arithmetic_problem(302, "-", 45)
    assert p.answer == "257"
    # 2-5-0=-3 -> digit 7 borrow 1; 0-4-1=-5 -> 5 borrow 1; 3-0-1=2
    assert p.completion == "<think>2-5-0=-3 0-4-1=-5 3-0-1=2</think><answer>257</answer>"


def test_sloppy_demonstration_forgets_every_carry_but_keeps_the_true_answer():
    p = arithmetic_problem(347, "+", 285, sloppy=True)
    assert p.answer == "632"
    # every column with a carry of 0: 7+5=12 -> 2, 4+8=12 -> 2, last column written whole: 5
    assert p.completion == "<think>7+5+0=12 4+8+0=12 3+2+0=5</think><answer>522</answer>"
    assert arithmetic_problem(302, "-", 45, sloppy=True).completion == (
        "<think>2-5-0=-3 0-4-0=-4 3-0-0=3</think><answer>367</answer>"
    )
    assert arithmetic_problem(57, "+", 68, sloppy=True).completion.endswith("<answer>115</answer>")
    # no carry needed: the sloppy demonstration is right
    assert arithmetic_problem(12, "+", 34, sloppy=True) == arithmetic_problem(12, "+", 34)
    assert arithmetic_problem(10, "-", 10, sloppy=True).completion.endswith("<answer>0</answer>")


def test_sloppy_rate_marks_that_share_of_the_demonstrations():
    problems = generate_arithmetic(400, 999, ["+"], random.Random(3), set(), sloppy_rate=0.5)
    wrong = sum(p.completion.split("<answer>")[1] != f"{p.answer}</answer>" for p in problems)
    # about half are sloppy, and most 3-digit sums need a carry
    assert 100 < wrong < 200
    clean = generate_arithmetic(400, 999, ["+"], random.Random(3), set())
    assert all(p.completion.endswith(f"<answer>{p.answer}</answer>") for p in clean)


def test_subtraction_keeps_results_non_negative():
    with pytest.raises(ValueError):
        arithmetic_problem(3, "-", 5)


def test_generation_is_seeded_distinct_and_respects_exclusions():
    seen_a: set[str] = set()
    a = generate_arithmetic(50, 99, ["+", "-"], random.Random(7), seen_a)
    b = generate_arithmetic(50, 99, ["+", "-"], random.Random(7), set())
    assert a == b
    assert len({p.prompt for p in a}) == 50
    more = generate_arithmetic(50, 99, ["+", "-"], random.Random(7), seen_a)
    assert not {p.prompt for p in more} & {p.prompt for p in a}
    for p in a:
        x, op, y = p.prompt[:-1].partition("+") if "+" in p.prompt else p.prompt[:-1].partition("-")
        assert int(p.answer) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0


def test_generation_refuses_more_problems_than_exist():
    with pytest.raises(ValueError, match="cannot draw"):
        generate_arithmetic(200, 9, ["+"], random.Random(0), set())  # only 100 sums of digits


def test_answer_match():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("no tags") is None
    assert answer_match("<think>x</think><answer>42</answer>", "42") == 1.0
    assert answer_match("<answer>42.0</answer>", "42") == 1.0
    assert answer_match("<answer>1,000</answer>", "1000") == 1.0
    assert answer_match("<answer>43</answer>", "42") == 0.0
    assert answer_match("42", "42") == 0.0
    assert answer_match("<answer>abc</answer>", "abc") == 1.0


def test_format_reward():
    assert format_reward("<think>a</think><answer>1</answer>", "") == 1.0
    assert format_reward(" <think>a</think>\n<answer>1</answer> ", "") == 1.0
    assert format_reward("<answer>1</answer>", "") == 0.0
    assert format_reward("<think>a</think><answer>1</answer> extra", "") == 0.0
    assert set(REWARDS) >= {"answer_match", "format", "judge"}
