"""Position-encoding lab (issue 7): small models trained identically with each position encoding of the survey
(seed 001), then evaluated far beyond their training length.

`encodings/` holds one module per encoding, `model.py` the reference transformer and its save/load format,
`train.py` the resumable trainer, `compare.py` the PPL-by-length comparison.
"""
