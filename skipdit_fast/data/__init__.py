"""Data the package ships or reads without a download: scikit-learn's digits for the
shipped tiny image models (digits.py) and moving digits, the same digits sliding and
bouncing across a larger canvas, for the shipped tiny video models
(moving_digits.py). Layer: imports no other part of skipdit_fast."""
