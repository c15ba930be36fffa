"""Trace store: round trips through real files, atomic writes, no duplicates."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import reward.traces as traces
from reward.compose import compose_token_rewards
from reward.config import RewardConfig
from reward.traces import (
    TRACE_COLUMNS,
    TRACE_SCHEMA_VERSION,
    list_trace_steps,
    read_traces,
    remove_stale_temp_files,
    trace_columns,
    trace_path,
    write_traces,
)


def rows(step: int = 3) -> list[dict]:
    return [
        {
            "step": step,
            "sample_id": 0,
            "prompt": "the cat",
            "response": "sat </s>",
            "tokens": ["sat", "</s>"],
            "token_ids": [8, 2],
            "logprob": [-1.5, -0.25],
            "ref_logprob": [-1.0, -0.5],
            "dpo_logprob": [-0.5, -0.5],
            "reward_dpo": [0.025, 0.0],
            "reward_kl": [-0.005, 0.0025],
            "reward": [0.02, 1.0025],
            "value": [0.5, 0.75],
            "advantage": [0.25, 0.25],
            "return": [0.75, 1.0],
            "rm_score": 1.0,
            "gt_reward": 0.5,
        },
        {  # mode 'ppo', no critic, no ground truth: nullable columns left out
            "step": step,
            "sample_id": 1,
            "prompt": "a dog",
            "response": "ran fast home",
            "tokens": ["ran", "fast", "home"],
            "token_ids": torch.tensor([9, 13, 12]),
            "logprob": torch.tensor([-1.0, -2.0, -3.0]),
            "ref_logprob": [-1.0, -1.0, -1.0],
            "reward_kl": [0.0, -0.01, -0.02],
            "reward": [0.0, -0.01, -1.52],
            "rm_score": -1.5,
        },
    ]


def test_round_trip_with_plain_pyarrow_and_pandas(tmp_path):
    path = write_traces(trace_path(tmp_path, 3), rows())
    assert path.name == "step-000003.parquet"
    table = pq.read_table(path)
    assert table.schema.names == TRACE_COLUMNS
    assert table.schema.metadata[b"rto.trace_schema_version"] == TRACE_SCHEMA_VERSION.encode()
    frame = pd.read_parquet(path)
    assert frame["sample_id"].tolist() == [0, 1]
    assert list(frame.loc[0, "tokens"]) == ["sat", "</s>"]
    assert list(frame.loc[1, "token_ids"]) == [9, 13, 12]
    assert list(frame.loc[0, "reward"]) == pytest.approx([0.02, 1.0025])
    assert frame.loc[1, "dpo_logprob"] is None and frame.loc[1, "value"] is None
    assert pd.isna(frame.loc[1, "gt_reward"]) and frame.loc[1, "rm_score"] == -1.5
    ours = read_traces(path)
    assert ours.attrs["trace_schema_version"] == TRACE_SCHEMA_VERSION
    assert list(ours.loc[0, "return"]) == pytest.approx([0.75, 1.0])


def test_columns_input_and_directory_reads(tmp_path):
    batch = rows(step=1)
    columns = {name: [row.get(name) for row in batch] for name in TRACE_COLUMNS}
    write_traces(trace_path(tmp_path, 1), columns)
    write_traces(trace_path(tmp_path, 2), rows(step=2))
    (tmp_path / ".step-000004.parquet.tmp-1-abc").write_bytes(b"half a file")  # a crashed writer's leftover
    assert list_trace_steps(tmp_path) == [1, 2]
    everything = read_traces(tmp_path)
    assert everything["step"].tolist() == [1, 1, 2, 2]
    assert read_traces(tmp_path, step=2)["step"].tolist() == [2, 2]
    with pytest.raises(FileNotFoundError):
        read_traces(tmp_path, step=7)
    assert list_trace_steps(tmp_path / "nothing-here") == []
    assert remove_stale_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001.parquet", "step-000002.parquet"]


def test_refuses_duplicates_unless_told(tmp_path):
    path = write_traces(trace_path(tmp_path, 5), rows(step=5))
    with pytest.raises(FileExistsError):
        write_traces(path, rows(step=6))
    assert read_traces(path)["step"].tolist() == [5, 5]
    write_traces(path, rows(step=6), overwrite=True)
    assert read_traces(path)["step"].tolist() == [6, 6]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005.parquet"]


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_write_table = traces.pq.write_table

    def write_half_then_crash(table, where, **kwargs):
        real_write_table(table.slice(0, 1), where, **kwargs)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(traces.pq, "write_table", write_half_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        write_traces(trace_path(tmp_path, 1), rows(step=1))
    assert list(tmp_path.iterdir()) == []  # no final file, no temp file
    monkeypatch.undo()
    write_traces(trace_path(tmp_path, 1), rows(step=1))  # a retry succeeds
    assert list_trace_steps(tmp_path) == [1]


def test_bad_rows_are_rejected(tmp_path):
    bad = rows()
    bad[0]["reward"] = [0.1]
    with pytest.raises(ValueError, match="'reward' has 1 entries"):
        write_traces(tmp_path / "a.parquet", bad)
    bad = rows()
    del bad[1]["ref_logprob"]
    with pytest.raises(ValueError, match="'ref_logprob' is required"):
        write_traces(tmp_path / "a.parquet", bad)
    bad = rows()
    bad[0]["kl"] = [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown columns"):
        write_traces(tmp_path / "a.parquet", bad)
    assert list(tmp_path.iterdir()) == []


def test_other_schema_versions_are_refused(tmp_path):
    path = write_traces(tmp_path / "t.parquet", rows())
    table = pq.read_table(path)
    pq.write_table(
        table.replace_schema_metadata({"rto.trace_schema_version": "999"}), tmp_path / "old.parquet"
    )
    with pytest.raises(ValueError, match="version 999"):
        read_traces(tmp_path / "old.parquet")


def test_without_hard_links_still_refuses_duplicates(tmp_path, monkeypatch):
    def no_links(*args):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(traces.os, "link", no_links)
    path = write_traces(trace_path(tmp_path, 1), rows(step=1))
    with pytest.raises(FileExistsError):
        write_traces(path, rows(step=2))
    assert read_traces(path)["step"].tolist() == [1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001.parquet"]


def test_rto_rewards_on_file_equal_the_sum_of_their_components(tmp_path):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    generator = torch.Generator().manual_seed(0)
    ref, policy, dpo = (-torch.rand(2, 4, generator=generator) * 3 for _ in range(3))
    rewards = compose_token_rewards(
        RewardConfig(),
        response_mask=mask,
        logprobs=policy,
        ref_logprobs=ref,
        dpo_logprobs=dpo,
        rm_scores=torch.tensor([0.7, -2.0]),
        rm_mean=0.5,
        rm_std=1.5,
    )
    columns = trace_columns(
        step=4,
        prompts=["p0", "p1"],
        responses=["r0", "r1"],
        tokens=[["a", "b", "</s>"], ["a", "b", "c", "d"]],
        token_ids=torch.tensor([[4, 5, 2, 0], [4, 5, 6, 7]]),
        response_mask=mask,
        logprob=policy,
        ref_logprob=ref,
        dpo_logprob=dpo,
        reward_dpo=rewards.reward_dpo,
        reward_kl=rewards.reward_kl,
        reward=rewards.reward,
        value=None,
        rm_score=rewards.rm_score,
    )
    frame = read_traces(write_traces(trace_path(tmp_path, 4), columns))
    for _, row in frame.iterrows():
        assert len(row["reward"]) == len(row["token_ids"])
        rm_at_last = [0.0] * (len(row["reward"]) - 1) + [row["rm_score"]]
        expected = row["reward_dpo"] + row["reward_kl"] + rm_at_last
        assert row["reward"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert frame["value"].isna().all()
    assert list(frame.loc[0, "token_ids"]) == [4, 5, 2]
