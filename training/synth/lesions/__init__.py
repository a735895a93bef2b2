"""Lesion painters of the synthetic study engine, one family per module; the registry that maps
diagnosis keys to painters lives in ``training.synth.pathology``."""
