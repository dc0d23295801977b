"""tandem: disaggregated EAGLE-3 draft training and an expert-parallel MoE buffer."""

__version__ = "0.1.0"
