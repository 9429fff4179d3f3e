"""Position-encoding lab: small models trained identically with each position encoding of the survey of length
extrapolation and position encodings (Wang Jianing, NewBeeNLP: sinusoidal, T5 bias, RoPE, ALiBi, KERPLE, Sandwich,
XPOS, ...), then evaluated far beyond their training length.

`encodings/` holds one module per encoding, `model.py` the reference transformer and its save/load format (importing
this package registers the folder loader, so `lengthwise.load_model(lab_folder)` reads one), `train.py` the resumable
trainer, `compare.py` the PPL-by-length comparison.
"""

from lengthwise.lab import model as _model  # noqa: F401  (registers the lab folder loader)
