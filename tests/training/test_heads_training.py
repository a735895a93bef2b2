"""training.heads: the calibration fitted on validation recovers the offset and temperature it must undo."""

import numpy as np
import torch

from prima.models.heads import HeadOutput
from training.heads import fit_calibrations


def test_fitted_calibration_recovers_a_known_offset_and_temperature():
    rng = np.random.default_rng(0)
    n = 20000
    # training labels: prevalence 1/5 and 1/21 -> positive weights 4 and 20, the offsets log 4 and log 20
    train = np.zeros((2100, 2), dtype=np.int64)
    train[:420, 0] = 1
    train[:100, 1] = 1
    true = rng.normal(-3.0, 2.0, size=(n, 2))  # the true log-odds of each validation study and label
    val = (rng.random((n, 2)) < 1 / (1 + np.exp(-true))).astype(np.int64)
    offsets = np.log([1680 / 420, 2000 / 100])
    tiers_true = rng.normal(size=(n, 3))
    tiers = np.array([rng.choice(3, p=np.exp(row) / np.exp(row).sum()) for row in tiers_true])
    output = HeadOutput(diagnosis_logits=torch.from_numpy(2.0 * true + offsets).float(),  # over-confident
                        referral_logits=torch.from_numpy(0.5 * true + offsets).float(),  # under-confident
                        priority_logits=torch.from_numpy(3.0 * tiers_true).float())
    fitted = fit_calibrations(output, (train, train), (val, val, tiers))
    for name, temperature in (("diagnosis", 2.0), ("referral", 0.5), ("priority", 3.0)):
        assert abs(fitted[name].temperature / temperature - 1) < 0.05, (name, fitted[name].temperature)
    np.testing.assert_allclose(fitted["diagnosis"].shift.numpy(), offsets, rtol=1e-6)
    assert "abnormal" not in fitted  # heads without an abnormal logit
