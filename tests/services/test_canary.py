"""The canary rules: sticky arms by user hash, and the two one-sided tests."""

import subprocess
import sys

import pytest

from services.canary import CANARY_ARM, SERVING_ARM, ArmCounts, CanaryRule, arm_of, judge

RULE = CanaryRule(min_events=300, max_events=5000, margin=0.02, alpha=0.05)


def test_arms_split_users_by_the_configured_share_and_stay_put():
    users = [f"user-{i}" for i in range(20_000)]
    share = sum(arm_of(u, 0.3) == CANARY_ARM for u in users) / len(users)
    assert share == pytest.approx(0.3, abs=0.015)
    assert all(arm_of(u, 0.0) == SERVING_ARM for u in users[:1000])
    # A larger share only adds users to the canary: nobody in it leaves.
    assert all(arm_of(u, 0.5) == CANARY_ARM for u in users if arm_of(u, 0.3) == CANARY_ARM)


def test_the_arm_of_a_user_is_the_same_in_another_process():
    # Python's own hash() differs per process; the arm must not.
    code = "from services.canary import arm_of; print(''.join(arm_of(f'u{i}', 0.5)[0] " \
           "for i in range(64)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == "".join(arm_of(f"u{i}", 0.5)[0] for i in range(64))


def test_nothing_is_decided_on_too_little_evidence():
    verdict = judge(ArmCounts(299, 0), ArmCounts(5000, 2000), RULE)
    assert verdict.outcome == "wait" and "300 each" in verdict.reason


def test_a_clearly_worse_canary_is_rolled_back():
    verdict = judge(ArmCounts(300, 15), ArmCounts(300, 100), RULE)
    assert verdict.outcome == "rollback" and verdict.z_worse < -1.64


def test_an_equivalent_canary_is_promoted_once_the_evidence_suffices():
    assert judge(ArmCounts(300, 100), ArmCounts(300, 100), RULE).outcome == "wait"
    verdict = judge(ArmCounts(4000, 1333), ArmCounts(4000, 1333), RULE)
    assert verdict.outcome == "promote" and verdict.z_not_worse > 1.64


def test_a_slightly_worse_canary_is_not_promoted_and_ends_rolled_back_at_the_limit():
    # 3 points worse: more than the 2-point margin, too little to prove "worse" early.
    early = judge(ArmCounts(400, 120), ArmCounts(400, 132), RULE)
    assert early.outcome == "wait"
    late = judge(ArmCounts(5000, 1500), ArmCounts(5000, 1650), RULE)
    assert late.outcome == "rollback"


def test_all_hits_on_both_arms_is_not_a_division_by_zero():
    assert judge(ArmCounts(400, 400), ArmCounts(400, 400), RULE).outcome == "promote"
    assert judge(ArmCounts(400, 0), ArmCounts(400, 0), RULE).outcome == "promote"
