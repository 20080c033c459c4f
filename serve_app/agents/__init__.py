"""The agent workload: an LLM loop that calls tools (work in progress: not routed yet)."""
