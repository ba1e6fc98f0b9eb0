"""ODMT: an online-distillation multi-modal sequential recommender as a DVC pipeline.

The stages in ``stages/`` are thin scripts; everything they do lives here.
"""
