"""Membership inference: per-text scores under a model (`scores`), and how well they separate
members from non-members (`roc`). Higher score = more likely a member, for every method."""
