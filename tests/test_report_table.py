"""The final table of `rto run` names each policy by where it came from."""

from rto.report_table import policy_label


def test_the_base_policy_is_named_by_its_source():
    assert policy_label("base", None) == "random init"  # a built-in architecture
    assert policy_label("base", None, base_path="/models/image-vlm-v4") == "start (image-vlm-v4)"
    assert policy_label("base", None, base_path="HuggingFaceTB/SmolLM2-135M") == "start (SmolLM2-135M)"
    assert policy_label("base+adaptinfer", None, base_path="/m/v4/") == "start (v4) + adaptinfer"


def test_the_ppo_policy_is_named_by_its_reward():
    assert policy_label("ppo", "rto") == "RTO"
    assert policy_label("ppo", "ppo", "ground_truth") == "PPO (ground truth)"
    assert policy_label("sft", None, base_path="/x") == "SFT"
