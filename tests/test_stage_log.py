"""A stage's output relayed to a log (what the pipeline's task sends to the flow run's logs): levels, progress
bars at a sane rate, the terminal's copy untouched (issue 31, req 5)."""

import logging
import os
import re
import subprocess
import sys
import textwrap

from grpolab.runtime.stage_log import PROGRESS_EVERY_S, StreamRelay, run_relayed

from conftest import BIN, project_env

STAGE = r"""
import sys, traceback, warnings
from tqdm import tqdm
print("==> grpolab stage demo", flush=True)
for _ in tqdm(range(1000), desc="train", mininterval=0, miniters=1):
    pass
warnings.warn("careful")
print("    reward=0.5, loss=0.1", flush=True)
try:
    try:
        {}["nope"]
    except KeyError as exc:
        raise ValueError("scoring failed") from exc
except ValueError:
    traceback.print_exc()
print("after the traceback", file=sys.stderr)
print("grpolab: error: train.rewards.reward_file: bad.py: compute_score raised KeyError: 'nope' on data/x.parquet: row 3", file=sys.stderr)
sys.exit(2)
"""


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _logger(name: str) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(f"test_stage_log.{name}")
    records = Records()
    logger.handlers[:] = [records]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, records


def test_a_stages_lines_reach_the_log_at_their_levels_and_its_bar_at_a_sane_rate(tmp_path, capfd):
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(STAGE))
    logger, handler = _logger("stage")
    assert run_relayed([sys.executable, str(script)], {"PATH": "/usr/bin:/bin"}, logger) == 2
    logged = [(r.levelno, r.getMessage()) for r in handler.records]
    bar = [m for _, m in logged if m.startswith("train:")]
    # 1000 updates: the first, one per 10 % more done, the last (tqdm's closing line)
    assert 11 <= len(bar) <= 13 and bar[0].startswith("train:   0%") and "1000/1000" in bar[-1], bar
    levels = {m: level for level, m in logged}
    assert levels["==> grpolab stage demo"] == levels["    reward=0.5, loss=0.1"] == levels["after the traceback"] == logging.INFO
    [warning] = [m for m in levels if "UserWarning: careful" in m]
    assert levels[warning] == logging.WARNING and levels['  warnings.warn("careful")'] == logging.WARNING
    # the chained traceback, its frames, code lines and exception lines, all ERROR; the next line INFO again
    messages = [m for _, m in logged]
    first, last = messages.index("Traceback (most recent call last):"), messages.index("ValueError: scoring failed")
    assert messages.count("Traceback (most recent call last):") == 2 and "KeyError: 'nope'" in messages[first:last]
    assert {level for level, _ in logged[first:last + 1]} == {logging.ERROR}, logged[first:last + 1]
    assert (logging.ERROR, "grpolab: error: train.rewards.reward_file: bad.py: compute_score raised KeyError: 'nope' on data/x.parquet: row 3") in logged
    # the terminal got the output as written: every update of the bar, in place
    out, err = capfd.readouterr()
    assert out.startswith("==> grpolab stage demo\n") and err.count("\rtrain:") > 1000


def test_a_slow_bar_is_logged_every_30_s_and_output_cut_anywhere_reads_the_same(capsys):
    now = [0.0]
    logger, handler = _logger("slow")
    relay = StreamRelay(sys.stderr, logger, clock=lambda: now[0])
    # 31 updates 10 s apart, never 10 % more done between two (0 % to 5 %), each read in two cuts
    updates = [f"\rsft:   {i // 6}%|          | {i // 6}/100 [..]" for i in range(31)]
    for update in updates:
        relay.feed(update[:9].encode())
        relay.feed(update[9:].encode())
        now[0] += 10
    rest = "\r\nwarning: disk\r\n[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n" \
           "[rank0]: KeyError: 'nope'\ndone"
    for i in range(len(rest)):  # a byte at a time: "\r\n" cut in two is still one line end
        relay.feed(rest[i].encode())
    relay.feed(b"", final=True)
    logged = [(r.levelno, r.getMessage()) for r in handler.records]
    bar = [m for _, m in logged if m.startswith("sft:")]
    # one update per PROGRESS_EVERY_S (every third), and the bar's closing line (the one ended by "\r\n")
    assert PROGRESS_EVERY_S == 30 and bar == [u[1:] for u in updates[0:30:3]] + [updates[-1][1:]], bar
    assert logged[len(bar):] == [(logging.WARNING, "warning: disk"), (logging.ERROR, "[rank0]: Traceback (most recent call last):"),
                                 (logging.ERROR, '[rank0]:   File "x.py", line 1, in <module>'), (logging.ERROR, "[rank0]: KeyError: 'nope'"),
                                 (logging.INFO, "done")]
    assert capsys.readouterr().err == "".join(updates) + rest


# A hook in every Python process the test starts (on PYTHONPATH): the first `grpolab stage prepare` is killed
# (kill -9) as its interpreter starts, as a worker's OOM killer or a node's reboot would.
KILL_PREPARE_ONCE = """import os, signal
if open("/proc/self/cmdline", "rb").read().split(b"\\0")[-3:-1] == [b"stage", b"prepare"] and not os.path.exists(os.environ["KILLED"]):
    open(os.environ["KILLED"], "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_stage_is_retried_and_a_users_error_is_not_and_ends_grpolab_run(project, tmp_path):
    """`grpolab run` (Prefect's temporary server, the flow in-process) with a train file that is no parquet, its
    prepare stage killed the first time: retried once; the retry stops with the user's error, which is not
    retried, and is `grpolab run`'s last line, exit 2."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_PREPARE_ONCE)
    junk = project / "junk.parquet"
    junk.write_text("not parquet")
    env = {**project_env(), "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "KILLED": str(tmp_path / "killed")}
    proc = subprocess.run([f"{BIN}/grpolab", "run", "-S", f"data.train_files=[{junk}]", "-S", f"data.eval_files=[{junk}]", "-S", "sft.steps=0"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    named = f"grpolab: error: {junk}: not a readable parquet file"
    assert proc.returncode == 2 and proc.stderr.rstrip().splitlines()[-1].startswith(named), proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # DVC runs the stage through $SHELL or /bin/sh: bash execs the command (DVC sees -9), dash waits for it (137)
    assert (tmp_path / "killed").exists() and re.search(r"grpolab stage prepare, exited with (-9|137)\b", output), output[-3000:]
    # two tries of the task, the stage's work begun once (the killed one died before its banner)
    assert output.count("==> stage prepare") == 2 and output.count("==> grpolab stage prepare") == 1, output[-3000:]
