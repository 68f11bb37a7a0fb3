"""Data the package ships or reads without a download (scikit-learn's digits for the
shipped tiny models). Layer: imports no other part of skipdit_fast."""
