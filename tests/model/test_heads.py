import pytest
import torch

from prima.config import HeadsConfig
from prima.models.heads import TaskHeads


def test_output_shapes_and_thresholds():
    heads = TaskHeads(64, HeadsConfig(hidden=16, dropout=0.0), 52, 11, 3, diagnosis_thresholds=[0.5] * 52)
    out = heads(torch.randn(4, 64))
    assert out.diagnosis_logits.shape == (4, 52)
    assert out.referral_logits.shape == (4, 11)
    assert out.priority_logits.shape == (4, 3)
    assert torch.equal(heads.diagnosis_thresholds, torch.full((52,), 0.5))
    assert torch.equal(heads.referral_thresholds, torch.zeros(11))
    assert "diagnosis_thresholds" in heads.state_dict()  # thresholds travel with the weights
    # three linear layers per head
    assert sum(isinstance(m, torch.nn.Linear) for m in heads.diagnosis) == 3


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="thresholds"):
        TaskHeads(8, HeadsConfig(hidden=4), 52, 11, 3, diagnosis_thresholds=[0.0] * 51)
    with pytest.raises(ValueError, match="positive"):
        TaskHeads(8, HeadsConfig(hidden=0), 52, 11, 3)


def _pooling_heads(top: int = 3) -> TaskHeads:
    torch.manual_seed(0)
    return TaskHeads(64, HeadsConfig(hidden=16, dropout=0.0, diagnosis_pool="tokens", top_tokens=top), 5, 11, 3)


def test_token_pooling_is_the_mean_of_the_largest_token_scores_over_all_series():
    from prima.config import TOKEN_DIM
    from prima.models.batching import pack_studies

    heads = _pooling_heads().eval()
    assert not hasattr(heads, "diagnosis")
    series = [torch.randn(n, TOKEN_DIM) for n in (6, 2, 4)]  # study 0: series 0 and 1; study 1: series 2
    batch = pack_studies([[(series[0], "a"), (series[1], "b")], [(series[2], "c")]], ["x", "y"], 16, 16)
    embedding = torch.randn(2, 64)
    with torch.no_grad():
        out = heads.on_batch(embedding, batch.tokens, batch)
        per_series = heads.series_scores(batch.tokens, batch.token_mask)
        expected = []
        for members in ([0, 1], [2]):
            scores = heads.token_scorer(torch.cat([series[i] for i in members]))  # (tokens, 1 + diagnoses)
            expected.append(scores.topk(3, dim=0).values.mean(0))
        expected = torch.stack(expected)
    assert per_series.shape == (3, 3, 6) and torch.isinf(per_series[1, 2]).all()  # series 1 has two tokens
    torch.testing.assert_close(out.abnormal_logits, expected[:, 0])
    torch.testing.assert_close(out.diagnosis_logits, expected[:, 1:])
    assert out.referral_logits.shape == (2, 11) and out.priority_logits.shape == (2, 3)


def test_fewer_tokens_than_top_tokens_average_the_tokens_there_are():
    from prima.config import TOKEN_DIM

    heads = _pooling_heads(top=8).eval()
    tokens = torch.randn(1, 3, TOKEN_DIM)
    with torch.no_grad():
        scores = heads.series_scores(tokens, torch.ones(1, 3, dtype=torch.bool))
        out = heads(torch.randn(1, 64), scores[None])
        torch.testing.assert_close(out.diagnosis_logits[0], heads.token_scorer(tokens[0]).mean(0)[1:])


def test_token_pooling_arguments_are_checked():
    from prima.config import TOKEN_DIM

    pooling, plain = _pooling_heads(), TaskHeads(64, HeadsConfig(hidden=16), 5, 11, 3)
    with pytest.raises(ValueError, match="need series_scores"):
        pooling(torch.randn(1, 64))
    with pytest.raises(ValueError, match="must be None"):
        plain(torch.randn(1, 64), torch.zeros(1, 1, 3, 6))
    with pytest.raises(ValueError, match="not token scores"):
        plain.series_scores(torch.zeros(1, 2, TOKEN_DIM), torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad():  # no token at all (every series left out): no evidence either way
        assert torch.equal(pooling.eval()(torch.randn(1, 64), torch.full((1, 1, 3, 6), -torch.inf)).diagnosis_logits,
                           torch.zeros(1, 5))
        assert torch.equal(pooling(torch.randn(1, 64), torch.zeros(1, 0, 3, 6)).abnormal_logits, torch.zeros(1))
    with pytest.raises(ValueError, match="diagnosis_pool"):
        HeadsConfig(diagnosis_pool="registers")
    with pytest.raises(ValueError, match="top_tokens"):
        HeadsConfig(top_tokens=0)


@pytest.mark.parametrize("pool", ["embedding", "tokens"])
def test_calibration_folded_into_the_heads_equals_calibrating_their_outputs(pool):
    from prima.config import TOKEN_DIM
    from prima.models.heads import LogitCalibration

    torch.manual_seed(0)
    heads = TaskHeads(64, HeadsConfig(hidden=16, dropout=0.0, diagnosis_pool=pool, top_tokens=3), 5, 4, 3,
                      diagnosis_thresholds=[0.1, -0.2, 0.3, 0.0, 1.0], referral_thresholds=[0.5] * 4).eval()
    embedding, token_outputs = torch.randn(6, 64), torch.randn(12, 7, TOKEN_DIM)  # 6 studies of 2 series

    def outputs():
        if pool == "embedding":
            return heads(embedding)
        return heads(embedding, heads.series_scores(token_outputs, torch.ones(12, 7, dtype=torch.bool)).reshape(
            6, 2, 3, 6))

    before = outputs()
    calibrations = {"diagnosis": LogitCalibration(torch.tensor([1.0, 2.0, 0.0, -1.0, 6.9]), 0.8),
                    "referral": LogitCalibration(torch.tensor([0.5, 0.0, 3.0, 1.0]), 1.7),
                    "priority": LogitCalibration(torch.zeros(()), 2.5)}
    if pool == "tokens":
        calibrations["abnormal"] = LogitCalibration(torch.zeros(()), 5.0)
    thresholds = heads.diagnosis_thresholds.clone(), heads.referral_thresholds.clone()
    for output, calibration in calibrations.items():
        heads.calibrate(output, calibration)
    after = outputs()
    for name, calibration in calibrations.items():
        expected = calibration.apply(getattr(before, f"{name}_logits"))
        torch.testing.assert_close(getattr(after, f"{name}_logits"), expected, rtol=1e-5, atol=1e-5)
    # a threshold moves with its logit: every decision stays as it was
    for name, old in zip(("diagnosis", "referral"), thresholds):
        torch.testing.assert_close(getattr(heads, f"{name}_thresholds"), calibrations[name].apply(old))
        assert torch.equal(getattr(after, f"{name}_logits") > getattr(heads, f"{name}_thresholds"),
                           getattr(before, f"{name}_logits") > old)


def test_calibration_arguments_are_checked():
    from prima.models.heads import LogitCalibration

    with pytest.raises(ValueError, match="temperature"):
        LogitCalibration(torch.zeros(()), 0.0)
    heads = TaskHeads(8, HeadsConfig(hidden=4), 5, 4, 3)
    with pytest.raises(ValueError, match="unknown output"):
        heads.calibrate("diagnoses", LogitCalibration(torch.zeros(()), 1.0))
    with pytest.raises(ValueError, match="no abnormal logit"):
        heads.calibrate("abnormal", LogitCalibration(torch.zeros(()), 1.0))
