"""RoPE maths: pure functions (frequencies, rotations); no patching here."""
