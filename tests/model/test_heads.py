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
