"""The paper's metrics on hand-made score matrices and routing decisions."""
import pytest

from evaluate import average_rouge, backward_transfer, routing_scores, routing_steps

# scores[j][i]: ROUGE-L of task i after stage j (only i <= j is ever used)
SCORES = [[50.0],
          [40.0, 60.0],
          [30.0, 55.0, 70.0]]


def test_ar_is_the_mean_over_tasks_after_the_last_stage():
    assert average_rouge(SCORES) == pytest.approx((30 + 55 + 70) / 3)


def test_bwt_compares_each_earlier_task_with_just_after_it_was_learned():
    assert backward_transfer(SCORES) == pytest.approx(((30 - 50) + (55 - 60)) / 2)
    assert backward_transfer([[50.0], [50.0, 10.0]]) == 0.0, "no forgetting"
    assert backward_transfer([[42.0]]) == 0.0, "one task: nothing to forget"


def test_routing_precision_recall_f1_and_rb_acc():
    gold = ["qa", "qa", "qa", "qg", "qg", None, None, None, None]
    routes = ["qa", "qa", "qg", "qg", None, None, "qa", None, None]
    s = routing_scores(routes, gold)
    assert s["per_task"]["qa"] == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
    assert s["per_task"]["qg"] == pytest.approx(dict(precision=1 / 2, recall=1 / 2, f1=1 / 2))
    assert s["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2) and s["rb_acc"] == pytest.approx(3 / 4)


def test_perfect_routing_scores_one():
    gold = ["a", "b", None]
    s = routing_scores(gold, gold)
    assert s["f1"] == 1.0 and s["rb_acc"] == 1.0


def test_routing_steps_count_experts_visited_newest_first():
    experts = ["qa", "qg", "sa"]  # training order: sa is asked first
    assert routing_steps(["sa", "qg", "qa", None], experts) == pytest.approx((1 + 2 + 3 + 3) / 4)
