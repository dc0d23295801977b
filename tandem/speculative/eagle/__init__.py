"""EAGLE-3 draft training: target wrapper, supervision, draft, trainer, decoding."""
