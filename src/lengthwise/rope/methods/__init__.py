"""The RoPE rescaling methods, one module each: its config, plan function, `rope_parameters` export and `METHOD` row
(`lengthwise.rope.method.RopeMethod`). `lengthwise.rope.table` collects every module's row."""
