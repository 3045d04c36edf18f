"""HungarianMatcher against brute force, its edge cases, and the DETR set loss built on it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_convert

from idrecog.tasks import HeadContext, create_task_type
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.matcher import HungarianMatcher

torch.set_num_threads(1)


def _random_case(gen: torch.Generator, num_queries: int, num_targets: int, num_classes: int = 3):
    logits = torch.randn(1, num_queries, num_classes + 1, generator=gen)
    boxes = torch.rand(1, num_queries, 4, generator=gen) * 0.5 + 0.25
    cxcy = torch.rand(num_targets, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(num_targets, 2, generator=gen) * 0.3 + 0.05
    target = {
        "labels": torch.randint(0, num_classes, (num_targets,), generator=gen),
        "boxes": torch.cat([cxcy, wh], 1),
    }
    return logits, boxes, target


def _brute_force_min(cost: torch.Tensor) -> float:
    n_q, n_t = cost.shape
    if n_t <= n_q:  # every target gets a distinct query
        return min(
            sum(cost[q, t].item() for t, q in enumerate(p)) for p in itertools.permutations(range(n_q), n_t)
        )
    # truncated: every query gets a distinct target
    return min(
        sum(cost[q, t].item() for q, t in enumerate(p)) for p in itertools.permutations(range(n_t), n_q)
    )


@pytest.mark.parametrize("seed", range(12))
def test_assignment_cost_equals_brute_force_minimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_queries = 2 + seed % 4
    num_targets = (seed * 7) % (num_queries + 2)  # 0 .. num_queries + 1: includes more targets than queries
    logits, boxes, target = _random_case(gen, num_queries, num_targets)
    matcher = HungarianMatcher(1.0, 5.0, 2.0)
    with pytest.warns(UserWarning, match="truncated") if num_targets > num_queries else _no_warning():
        ((qi, ti),) = matcher(logits, boxes, [target])
    k = min(num_queries, num_targets)
    assert len(qi) == len(ti) == k
    assert len(set(qi.tolist())) == k and len(set(ti.tolist())) == k, "one-to-one"
    if k == 0:
        return
    cost = matcher.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
    assert cost.shape == (num_queries, num_targets)
    assert cost[qi, ti].sum().item() == pytest.approx(_brute_force_min(cost), abs=1e-5)


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def test_cost_terms_follow_their_definition() -> None:
    # one query, one target: class prob, L1 and GIoU computed by hand
    logits = torch.tensor([[0.0, 1.0, 0.0]])  # C = 2 + no-object
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    p = torch.softmax(logits, -1)[0, 1].item()
    # xyxy: [0.4, 0.4, 0.6, 0.6] vs [0.5, 0.4, 0.7, 0.6]: inter 0.02, union 0.06, hull = union -> GIoU = 1/3
    expected = 3.0 * -p + 5.0 * 0.1 + 7.0 * -(1.0 / 3.0)
    cost = HungarianMatcher(3.0, 5.0, 7.0).cost_matrix(logits, box, torch.tensor([1]), tgt)
    assert cost.item() == pytest.approx(expected, abs=1e-5)


def test_recovers_a_known_permutation() -> None:
    gen = torch.Generator().manual_seed(0)
    _, _, target = _random_case(gen, 5, 5)
    perm = torch.tensor([3, 0, 4, 1, 2])  # query perm[j] predicts target j exactly
    boxes = torch.zeros(1, 5, 4)
    logits = torch.full((1, 5, 4), -5.0)
    boxes[0, perm] = target["boxes"]
    logits[0, perm, target["labels"]] = 5.0
    ((qi, ti),) = HungarianMatcher()(logits, boxes, [target])
    assert torch.equal(qi[ti.argsort()], perm)


def test_no_targets_and_absent_samples_match_nothing() -> None:
    logits, boxes = torch.randn(3, 4, 3), torch.rand(3, 4, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    gen = torch.Generator().manual_seed(1)
    _, _, one = _random_case(gen, 4, 2, num_classes=2)
    out = HungarianMatcher()(logits, boxes, [empty, None, one])
    assert [len(q) for q, _ in out] == [0, 0, 2]
    assert all(q.dtype == torch.long and t.dtype == torch.long for q, t in out)


def test_batched_matching_equals_per_sample_matching() -> None:
    # the batch's cost blocks are computed together (targets padded); each sample is matched against its own
    gen = torch.Generator().manual_seed(3)
    cases = [_random_case(gen, 4, n) for n in (3, 0, 4, 1)]
    logits = torch.cat([c[0] for c in cases])
    boxes = torch.cat([c[1] for c in cases])
    targets = [c[2] for c in cases]
    targets[1] = None
    batched = HungarianMatcher()(logits, boxes, targets)
    for i, t in enumerate(targets):
        ((q, ti),) = HungarianMatcher()(logits[i : i + 1], boxes[i : i + 1], [t])
        assert torch.equal(batched[i][0], q) and torch.equal(batched[i][1], ti)


def test_padded_batched_cost_equals_per_sample_cost_matrix() -> None:
    gen = torch.Generator().manual_seed(5)
    cases = [_random_case(gen, 5, n) for n in (3, 1, 4)]
    m = HungarianMatcher()
    labels = torch.zeros(3, 4, dtype=torch.long)
    tboxes = torch.rand(3, 4, 4, generator=gen) * 0.4 + 0.1  # padding slots hold arbitrary valid boxes
    for j, (_, _, t) in enumerate(cases):
        labels[j, : len(t["labels"])] = t["labels"]
        tboxes[j, : len(t["labels"])] = t["boxes"]
    blocks = m.batched_cost(
        torch.cat([c[0] for c in cases]), torch.cat([c[1] for c in cases]), labels, tboxes
    )
    assert blocks.shape == (3, 5, 4)
    for j, (lg, bx, t) in enumerate(cases):
        n = len(t["labels"])
        assert torch.allclose(blocks[j, :, :n], m.cost_matrix(lg[0], bx[0], t["labels"], t["boxes"]))


def test_rejects_mismatched_batch_and_all_zero_costs() -> None:
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(torch.randn(2, 3, 3), torch.rand(2, 3, 4), [None])
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


# ----------------------------------------------------------------------- the DETR set loss using it
def _detection(num_queries: int = 6):
    spec = TaskSpec(
        name="fields", type="detection", classes=("portrait", "mrz"), options={"num_queries": num_queries}
    )
    task = create_task_type(spec)
    torch.manual_seed(0)
    head = task.build_head(16)
    ctx = HeadContext(pixel_feats=None, image_size=(40, 64))
    return task, head, ctx


def test_set_loss_is_invariant_to_query_order() -> None:
    task, head, ctx = _detection()
    out = head(torch.randn(2, task.num_queries, 16), ctx)
    targets = [
        {
            "boxes": torch.tensor([[4.0, 5.0, 30.0, 20.0], [40.0, 10.0, 60.0, 38.0]]),
            "labels": torch.tensor([0, 1]),
        },
        {"boxes": torch.tensor([[10.0, 2.0, 20.0, 12.0]]), "labels": torch.tensor([1])},
    ]
    present = torch.tensor([True, True])
    perm = torch.randperm(task.num_queries)
    shuffled = {k: (v[:, perm] if k in ("logits", "boxes") else v) for k, v in out.items()}
    torch.testing.assert_close(task.loss(out, targets, present), task.loss(shuffled, targets, present))


def test_set_loss_is_lower_for_correct_predictions() -> None:
    task, _, ctx = _detection(num_queries=3)
    h, w = ctx.image_size
    tgt_xyxy = torch.tensor([[4.0, 5.0, 30.0, 20.0], [40.0, 10.0, 60.0, 38.0]])
    targets = [{"boxes": tgt_xyxy, "labels": torch.tensor([0, 1])}]
    norm = box_convert(tgt_xyxy / torch.tensor([w, h, w, h]), "xyxy", "cxcywh")
    # q0 predicts the mrz, q1 nothing (no-object), q2 the portrait, each with its exact box
    logits = torch.tensor([[[-4.0, 4.0, -4.0], [-4.0, -4.0, 4.0], [4.0, -4.0, -4.0]]])
    boxes = torch.stack([norm[1], torch.full((4,), 0.5), norm[0]])[None]
    good = {"logits": logits, "boxes": boxes, "image_size": torch.tensor([[h, w]])}
    bad = {**good, "boxes": boxes.flip(-1)}  # same classes, wrong boxes
    present = torch.tensor([True])
    loss_good, loss_bad = task.loss(good, targets, present), task.loss(bad, targets, present)
    assert loss_good < loss_bad


def test_present_sample_without_objects_trains_no_object() -> None:
    task, head, ctx = _detection()
    out = head(torch.randn(1, task.num_queries, 16), ctx)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    loss = task.loss(out, empty, torch.tensor([True]))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert head.class_embed.weight.grad.abs().sum() > 0
