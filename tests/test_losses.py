"""Losses against values computed by hand on tiny inputs."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prima.losses import ClipLoss, PatientDiscriminationLoss, positive_weights, priority_ce, weighted_bce


def _nll(target: float, others: list[float]) -> float:
    return -math.log(math.exp(target) / (math.exp(target) + sum(math.exp(o) for o in others)))


IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def test_clip_loss_by_hand():
    scale = torch.tensor(2.0)
    # image->text logits = 2 * [[1, .6], [0, .8]]; text->image is its transpose
    image_to_text = (_nll(2.0, [1.2]) + _nll(1.6, [0.0])) / 2
    text_to_image = (_nll(2.0, [0.0]) + _nll(1.6, [1.2])) / 2
    expected = (image_to_text + text_to_image) / 2
    assert ClipLoss()(IMAGE, TEXT, scale).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        ClipLoss()(IMAGE, TEXT[:1], torch.tensor(1.0))


def _clip_rank(rank: int, world: int, init_file: str, image, text, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = image.shape[0] // world
    local = slice(rank * half, (rank + 1) * half)
    out[rank] = ClipLoss()(image[local], text[local], torch.tensor(3.0)).item()
    dist.destroy_process_group()


def test_clip_loss_gathers_negatives_across_processes(tmp_path):
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    results = mp.Manager().dict()
    mp.spawn(_clip_rank, args=(2, str(tmp_path / "init"), image, text, results), nprocs=2)
    # each process averages its own rows against the global batch: the mean over processes is
    # the single-process loss on the whole batch
    expected = ClipLoss()(image, text, torch.tensor(3.0)).item()
    assert (results[0] + results[1]) / 2 == pytest.approx(expected, rel=1e-5)
    assert results[0] != pytest.approx(results[1])


def test_patient_discrimination_by_hand():
    # series 0 and 1 are from study 0, series 2 from study 1; tau_p = 0.1
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    study = torch.tensor([0, 0, 1])
    # similarities: s01 = .6, s02 = 0, s12 = .8, self = 1; logits are similarities / 0.1
    s0 = -math.log((math.exp(10) + math.exp(6)) / (math.exp(10) + math.exp(6) + math.exp(0)))
    s1 = -math.log((math.exp(6) + math.exp(10)) / (math.exp(6) + math.exp(10) + math.exp(8)))
    s2 = -math.log(math.exp(10) / (math.exp(0) + math.exp(8) + math.exp(10)))
    expected = ((s0 + s1) / 2 + s2) / 2
    loss = PatientDiscriminationLoss()(features, study, torch.tensor(10.0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_patient_discrimination_does_not_depend_on_study_ids_or_order():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    loss = PatientDiscriminationLoss()
    a = loss(features, torch.tensor([0, 0, 1, 1, 1]), torch.tensor(10.0))
    order = torch.tensor([4, 0, 3, 1, 2])
    b = loss(features[order], torch.tensor([7, 3, 7, 3, 7]), torch.tensor(10.0))
    torch.testing.assert_close(a, b)


def test_patient_discrimination_ignores_series_without_tokens():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    study = torch.tensor([0, 0, 1, 1, 2])
    loss = PatientDiscriminationLoss()
    reference = loss(features, study, torch.tensor(10.0))
    # Dropped series (every token masked) all get the same embedding: one in study 0, one in study 1,
    # and study 3 whose only series was dropped.
    dropped = torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=-1).expand(3, 8)
    with_dropped = torch.cat([features[:2], dropped[:1], features[2:4], dropped[1:], features[4:]])
    study_with_dropped = torch.tensor([0, 0, 0, 1, 1, 1, 3, 2])
    valid = torch.tensor([True, True, False, True, True, False, False, True])
    torch.testing.assert_close(loss(with_dropped, study_with_dropped, torch.tensor(10.0), valid), reference)
    assert loss(with_dropped, study_with_dropped, torch.tensor(10.0)) != pytest.approx(reference.item())
    torch.testing.assert_close(loss(features, study, torch.tensor(10.0), torch.ones(5, dtype=torch.bool)), reference)
    with pytest.raises(ValueError, match="series_valid"):
        loss(features, study, torch.tensor(10.0), valid)


def test_patient_discrimination_without_any_valid_series_is_a_connected_zero():
    features = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    loss = PatientDiscriminationLoss()(features, torch.tensor([0, 0, 1]), scale, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features)) and scale.grad == 0


def test_weighted_bce_and_positive_weights_by_hand():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (3 * math.log(2) + math.log(1 + math.exp(2))) / 2
    assert weighted_bce(logits, targets, torch.tensor([3.0, 3.0])).item() == pytest.approx(expected, rel=1e-6)

    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]])
    # the last column is positive everywhere: plain BCE (1), not neg/pos = 0 which would ignore it
    assert positive_weights(labels, max_weight=50.0).tolist() == [1.0, 3.0, 50.0, 1.0]


def test_priority_ce_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert priority_ce(logits, torch.tensor([2])).item() == pytest.approx(_nll(2.0, [0.0, 1.0]), rel=1e-6)
