"""`rto report`: one self-contained HTML page, checked as text and in a real headless Chromium
(no console errors with the network cut off, the DOM has the plots and the heatmap, a screenshot
shows both)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _trace_run_fixtures import make_run, run_cli
from pipeline_helpers import rto

from rto.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def page(run, tmp_path_factory):
    output = tmp_path_factory.mktemp("page") / "report.html"
    result = rto("report", str(run), "-o", str(output), "--samples", "1")
    assert result.returncode == 0, result.stderr
    return output


def test_page_is_self_contained(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing to fetch: no external scripts, styles, images, fonts or frames
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.IGNORECASE)
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:|//)", text, re.IGNORECASE)
    # SVG namespace URIs are the only URLs on the page
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    # every id is unique although several matplotlib figures share the page
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))


def test_page_content(run):
    text = build_report(run, samples=1)
    assert text.count("<svg") == 4  # rewards, KL and losses, rollouts, training stages
    for title in ("token reward", "ground truth", "KL to the reference", "policy loss", "sft training loss"):
        assert title in text
    # summary tables, including eval's policies x figures
    assert "<h3>sft</h3>" in text and "<h4>policies</h4>" in text
    assert "ppo in progress (traces up to step 3)" in text
    # heatmaps of the first, middle and last step: best and worst sample, 4 tokens each
    assert [int(s) for s in re.findall(r"<h3>step (\d+)", text)] == [1, 2, 3]
    assert text.count('class="tok"') == 3 * 2 * 4
    # hovering a token shows its components: sample 3's <eos> (reward 0 - 0.01 + rm 1.0)
    assert "#3 &#x27;&lt;eos&gt;&#x27;\nreward: +0.9900\ndpo: +0.0000\nkl: -0.0100\nvalue: +0.4000" in text
    assert "data-kl=" in text and "data-advantage=" in text
    # one step only, on request
    assert re.findall(r"<h3>step (\d+)", build_report(run, steps=[2])) == ["2"]


def test_held_out_curve_and_dpo_refresh_get_their_panels(tmp_path):
    """Runs that log a held-out curve (ppo.eval_every) and DPO refreshes (ppo.dpo_refresh) show them;
    the others get no empty panel (test_page_content counts 4 figures)."""
    import json

    run = make_run(tmp_path / "run", cut_last_metrics_line=False)
    extra = [
        {"stage": "ppo", "step": 2, "heldout_gt": 0.4, "dpo_refresh_loss": 0.69, "dpo_refresh_accuracy": 0.5},
        {"stage": "ppo", "step": 3, "heldout_gt": 0.6, "dpo_gt_auc": 0.7},
    ]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(next((e for e in extra if e["step"] == row.get("step") and row["stage"] == "ppo"), {}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(run, samples=1)
    assert text.count("<svg") == 5
    for title in ("held-out", "Token reward model", "online DPO refresh", "DPO term vs ground truth"):
        assert title in text, title


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: None, [], "no such run directory"),
        (lambda d: d.mkdir(), [], "not a run directory"),
        (lambda d: make_run(d), ["--step", "7"], "no traces for step(s) [7]"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, make, args, message):
    make(tmp_path / "run")
    code, _, stderr = run_cli("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), *args)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert message in stderr
    assert not (tmp_path / "r.html").exists()


def test_run_without_traces_still_reports_its_stages(tmp_path):
    run = make_run(tmp_path / "run")
    shutil.rmtree(run / "traces")
    text = build_report(run)
    assert "No reward traces yet" in text and "sft training loss" in text


def chromium(*args: str, profile: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium, offline: every host name fails to resolve, so a page that tried to fetch
    anything would log a console error."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_messages_are_detected(tmp_path):
    """The check below would see a broken page: Chromium logs console output and script errors."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>missing_function();</script></body></html>")
    result = chromium("--dump-dom", bad.as_uri(), profile=tmp_path / "profile")
    assert any("missing_function is not defined" in line for line in console_lines(result.stderr))


@needs_chromium
def test_page_in_headless_chromium(page, tmp_path):
    import matplotlib.image

    # the DOM after the page's script ran, with the component picked by the URL (#color=kl)
    result = chromium("--dump-dom", page.as_uri() + "#color=kl", profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    dom = result.stdout
    assert dom.count("<svg") == 4 and dom.count('class="tok"') == 24
    spans = re.findall(r'<span class="tok" style="([^"]*)"[^>]*data-kl="(#[0-9a-f]{6})\|', dom)
    assert len(spans) == 24
    for style, kl_color in spans:  # every token now shows its KL colour
        r, g, b = (int(kl_color[i : i + 2], 16) for i in (1, 3, 5))
        assert f"rgb({r}, {g}, {b})" in style

    shot = tmp_path / "report.png"
    result = chromium(
        "--window-size=1300,2200", f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "profile"
    )
    assert console_lines(result.stderr) == []
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()

    def count(rgb, tolerance=12):
        return int((abs(pixels - rgb).max(axis=-1) <= tolerance).sum())

    assert count((31, 119, 180)) > 500  # the plots' first series (matplotlib's blue)
    assert count((255, 127, 14)) > 100  # their second series (orange)
    assert count((5, 48, 97)) > 200  # saturated blue tokens: the best samples' last token
    assert count((103, 0, 31)) > 50  # saturated red tokens: the worst samples' last token


def test_tensorboard_has_scalars_and_sample_traces(tmp_path):
    """StepLogger writes each step's figures as scalars and its best and worst samples (per-token
    rewards) as Markdown text; read back with TensorBoard's own event reader."""
    from _trace_run_fixtures import metrics_record, write_step
    from tensorboard.backend.event_processing import event_accumulator

    from rto.ppo.logging import StepLogger
    from rto.rundir import RunDir

    run = RunDir(tmp_path / "run").create()
    logger = StepLogger(run, tensorboard=True, wandb=False, cfg=None)
    for step in (1, 2):
        write_step(run.traces_dir, step)
        record = {k: v for k, v in metrics_record("ppo", step).items() if k not in ("stage", "step")}
        logger.log(step, record)
    logger.log(3, {"skipped": 1, "gt_reward": 0.0})  # a skipped batch: no trace file, no text
    logger.close()

    events = event_accumulator.EventAccumulator(
        str(run.root / "tensorboard" / "ppo"), size_guidance={event_accumulator.TENSORS: 0}
    ).Reload()
    gt = events.Scalars("ppo/gt_reward")
    assert [(e.step, round(e.value, 6)) for e in gt] == [(1, 0.1), (2, 0.2), (3, 0.0)]
    assert "ppo/kl" in events.Tags()["scalars"]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"] if tag.startswith("traces/")}
    assert sorted(texts) == ["traces/best/text_summary", "traces/worst/text_summary"]
    best = [e for e in texts["traces/best/text_summary"]]
    assert [e.step for e in best] == [1, 2]
    markdown = best[-1].tensor_proto.string_val[0].decode()
    assert "step 2, best sample" in markdown and "sample 3" in markdown
    assert "total +1.3300 = dpo +0.4300 + kl -0.1000 + rm +1.0000" in markdown
    assert "| 3 | `<eos>` | +0.9900 |" in markdown
    worst = texts["traces/worst/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert "sample 0" in worst and "total -0.4700" in worst
    # metrics.jsonl got the same records
    assert [r["step"] for r in run.read_metrics("ppo")] == [1, 2, 3]
