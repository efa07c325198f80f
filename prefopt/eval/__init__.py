"""Evaluation beyond the preference metrics: sampling-based reward, win rate and KL."""
