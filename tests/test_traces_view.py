"""`rto traces` and the views behind it: hand-computed breakdowns, colours, the terminal output,
bad input, and reading a run that a writer is still appending to."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import threading
import time

import pytest
from _trace_run_fixtures import make_run, metrics_record, run_cli, sample_row, write_step

from reward.traces import read_traces
from reward.views import (
    best_and_worst,
    breakdown,
    color_scale,
    display_tokens,
    diverging_color,
    load_step,
    markdown_sample,
    rank,
    show_traces,
)
from rto.errors import UserError


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def test_breakdown_matches_hand_computed_sums(run):
    frame = read_traces(run / "traces", step=2)
    table = breakdown(frame).set_index("sample_id")
    # sample 3 (k = 4): dpo 0.4 - 0.05 + 0.08 + 0 = 0.43; kl -0.01 - 0.08 + 0 - 0.01 = -0.10; rm 1.0
    assert table.loc[3, "dpo"] == pytest.approx(0.43, abs=1e-6)
    assert table.loc[3, "kl"] == pytest.approx(-0.10, abs=1e-6)
    assert table.loc[3, "rm"] == pytest.approx(1.0)
    assert table.loc[3, "total"] == pytest.approx(1.33, abs=1e-6)
    assert table.loc[3, "advantage"] == pytest.approx(0.125, abs=1e-6)
    assert table.loc[3, "gt"] == 1.5 and table.loc[3, "length"] == 4
    # sample 0 (k = 1): total = 0.6 - 1.07
    assert table.loc[0, "total"] == pytest.approx(-0.47, abs=1e-6)
    # the total is the sum of its parts for every sample
    assert (table["dpo"] + table["kl"] + table["rm"] - table["total"]).abs().max() < 1e-6


def test_ranking_best_and_worst(run):
    frame = read_traces(run / "traces", step=1)
    best, worst = best_and_worst(rank(frame, "reward"), 2)
    assert list(best["sample_id"]) == [3, 2]
    assert list(worst["sample_id"]) == [0, 1]  # worst first
    best, worst = best_and_worst(rank(frame, "kl"), 1)  # the KL term is largest (least negative) for 0
    assert list(best["sample_id"]) == [0] and list(worst["sample_id"]) == [3]
    best, worst = best_and_worst(rank(frame, "gt"), 10)  # never more than the samples, no overlap
    assert len(best) + len(worst) == 4 and not set(best.index) & set(worst.index)


def test_diverging_colours_and_scale(run):
    centre = diverging_color(0.0, 1.0)[0]  # RdBu's near-white centre, black text
    assert all(int(centre[i : i + 2], 16) >= 0xF0 for i in (1, 3, 5))
    assert diverging_color(0.0, 1.0)[1] == "#000000"
    light_red, light_blue = diverging_color(-0.3, 1.0)[0], diverging_color(0.3, 1.0)[0]
    assert int(light_red[1:3], 16) > int(light_red[5:7], 16)  # more red than blue below zero
    assert int(light_blue[5:7], 16) > int(light_blue[1:3], 16)  # more blue than red above zero
    assert diverging_color(-1.0, 1.0) == ("#67001f", "#ffffff")  # saturated red, white text
    assert diverging_color(5.0, 1.0) == ("#053061", "#ffffff")  # beyond the scale: saturated blue
    assert diverging_color(math.nan, 1.0)[0] == "#bdbdbd"
    frame = read_traces(run / "traces", step=1)
    # total reward: the last tokens (RM score, up to 1.0) are left out of the scale
    assert color_scale(frame, "reward") < 0.45
    assert color_scale(frame, "value") == pytest.approx(0.4, abs=0.01)


def test_display_tokens():
    assert display_tokens(["the", "cat", "."], space_markers=False) == ["the", " cat", " ."]
    assert display_tokens(["Ġthe", "Ġca", "t", "Ċ"], space_markers=True) == [" the", " ca", "t", "\n"]
    assert display_tokens(["▁the", "▁cat"], space_markers=True) == [" the", " cat"]


def test_markdown_sample_has_every_token():
    import pandas as pd

    row = pd.Series(sample_row(1, 3))
    text = markdown_sample(row, "best")
    assert "total +1.3300 = dpo +0.4300 + kl -0.1000 + rm +1.0000" in text
    assert text.count("\n| ") == 1 + 4  # header + one line per token
    assert "| 3 | `<eos>` | +0.9900 | +0.0000 | -0.0100 |" in text  # 0 + (-0.01) + rm 1.0


def test_show_traces_output(run):
    from rich.console import Console

    buffer = io.StringIO()
    show_traces(run, top=1, console=Console(file=buffer, width=120, color_system=None))
    out = buffer.getvalue()
    assert "step 3 · 4 samples" in out
    assert "best 1 by reward" in out and "worst 1 by reward" in out
    best_line = next(line for line in out.splitlines() if line.strip().startswith("3 "))
    assert "+0.4300" in best_line and "-0.1000" in best_line and "+1.3300" in best_line
    assert "#3 describe thing 3" in out and "#0 describe thing 0" in out

    # the same with colours: tokens carry truecolor backgrounds (red and blue)
    buffer = io.StringIO()
    show_traces(
        run, top=1, console=Console(file=buffer, width=120, color_system="truecolor", force_terminal=True)
    )
    assert "\x1b[" in buffer.getvalue() and ";48;2;" in buffer.getvalue()


def test_cli_sample_view(run):
    code, stdout, stderr = run_cli(
        "traces", str(run), "--step", "2", "--sample", "3", "--color", "dpo", "--sort", "gt"
    )
    assert code == 0, stderr
    assert "step 2 · 4 samples" in stdout
    assert "colour = dpo" in stdout
    assert "ref logp" in stdout
    # the token table's last row: <eos> with reward 0 + (-0.01) + rm 1.0, dpo 0, kl -0.01
    assert re.search(r"<eos>\s+\+0\.9900\s+\+0\.0000\s+-0\.0100", stdout)
    assert "+1.3300" in stdout  # the sample's total in its breakdown row


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{empty}"], "no reward traces"),
        (["{missing}"], "no such run directory"),
        (["{run}", "--step", "99"], "no traces for step 99"),
        (["{run}", "--sample", "42"], "no sample 42"),
        (["{run}", "--sort", "loudness"], "unknown sort key"),
        (["{run}", "--color", "blue"], "unknown component"),
    ],
)
def test_bad_input_is_one_line_exit_2(run, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"run": run, "empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    code, _, stderr = run_cli("traces", *[a.format(**paths) for a in args])
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert message in stderr


def _digest(directory):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_reading_a_run_that_is_being_written(tmp_path):
    """A writer keeps adding steps (atomic trace files, temp files, metrics lines written in two
    pieces) while `rto traces` and `rto report` views read: every read succeeds, shows only complete
    steps, and the run's files are exactly what the writer wrote."""
    from rich.console import Console

    from rto.report import build_report

    run = make_run(tmp_path / "run", steps=[1], cut_last_metrics_line=False)
    stop = threading.Event()
    written = [1]

    def writer():
        for step in range(2, 9):
            temp = run / "traces" / f".step-{step:06d}.parquet.tmp-99-{step}"
            temp.write_bytes(b"PAR1" + b"\0" * 512)  # a writer's half-written temp file
            write_step(run / "traces", step)
            written.append(step)  # a step may be read as soon as its trace file exists
            temp.unlink()
            line = json.dumps(metrics_record("ppo", step)) + "\n"
            with open(run / "metrics.jsonl", "a") as f:  # a line that arrives in two writes
                f.write(line[:20])
                f.flush()
                time.sleep(0.05)
                f.write(line[20:])
            time.sleep(0.1)
        stop.set()

    before = _digest(run)
    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        while not stop.is_set() or reads < 3:
            step, frame = load_step(run)
            assert step in written and len(frame) == 4
            show_traces(run, top=1, console=Console(file=io.StringIO(), width=100))
            page = build_report(run)
            assert "step 1" in page
            reads += 1
    finally:
        thread.join()
    assert reads >= 3
    after = _digest(run)
    for name, digest in before.items():
        if name != "metrics.jsonl":
            assert after[name] == digest, name  # nothing the reader saw was changed
    assert not [p for p in (run / "traces").iterdir() if ".tmp-99-" in p.name]
    for step in range(2, 9):
        frame = read_traces(run / "traces", step=step).sort_values("sample_id")
        for i, rewards in enumerate(frame["reward"]):
            assert rewards.tolist() == pytest.approx(sample_row(step, i)["reward"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "ppo"] == list(range(1, 9))


def test_load_step_reads_a_single_trace_file(run):
    step, frame = load_step(run / "traces" / "step-000002.parquet")
    assert step == 2 and len(frame) == 4
    with pytest.raises(UserError, match="--step"):
        load_step(run / "traces" / "step-000002.parquet", step=5)


HOSTILE_TOKENS = ["[/bold]", "[red]x", "\x1b]0;pwned\x07", "\x1b[31m", "ok\x9b2J", "<eos>"]


def test_trace_strings_are_shown_literally_never_as_markup_or_terminal_codes(tmp_path):
    """Tokens and prompts come from models and users: rich markup in them ("[/bold]" crashed the
    view) is printed as text, and ANSI/OSC escape sequences (which retitle or clear a terminal)
    reach the terminal only as visible escapes."""
    from _trace_run_fixtures import run_cli, sample_row

    from reward.traces import trace_path, write_traces

    rows = []
    for i in range(2):
        row = sample_row(1, i)
        n = len(HOSTILE_TOKENS)
        row.update(
            prompt="describe [bold]the\x1b[2J cat[/]", response="x", tokens=HOSTILE_TOKENS, token_ids=list(range(n)),
            **{k: (row[k] * 2)[:n] for k in ("logprob", "ref_logprob", "dpo_logprob", "reward_dpo", "reward_kl",
                                            "reward", "value", "advantage", "return")},
        )  # fmt: skip
        rows.append(row)
    write_traces(trace_path(tmp_path / "run" / "traces", 1), rows)
    for extra in ([], ["--sample", "0"]):
        code, out, err = run_cli("traces", str(tmp_path / "run"), *extra)
        assert code == 0, err
        assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
        assert "[/bold]" in out and "[red]x" in out and "\\x1b]0;pwned\\x07" in out
        assert "describe [bold]the\\x1b[2J cat[/]" in out
