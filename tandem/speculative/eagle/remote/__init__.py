"""Re-exports of the remote target's seed modules; the code is in ``tandem.speculative.remote``."""
