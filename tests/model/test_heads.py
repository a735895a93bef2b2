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
