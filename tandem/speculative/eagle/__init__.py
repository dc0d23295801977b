"""The original design's import paths (``tandem.speculative.eagle.remote.server``, ``...remote.transport``).

The code lives by role under ``tandem.speculative``; these modules only re-export what the specification
pages name, so code written against the original layout keeps working.
"""
