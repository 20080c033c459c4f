"""The agent workload's logic: the action format, the loop, the tools (no Serve here)."""
