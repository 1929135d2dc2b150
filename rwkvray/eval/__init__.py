"""Testing states: score the base model and tuned states on eval rows (see items.py), locally or on Serve."""
