"""Reliability parts with no Ray in them: breakers, admission, rate limits, watchdogs, rollout decisions."""
