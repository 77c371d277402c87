"""Evaluation: task generators and scorers, the resumable bench runner, reports and plots."""
