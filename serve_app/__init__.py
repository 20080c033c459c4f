"""torchrank-miner: a Ray Serve miner for TorchRank / Bittensor subnets."""

__version__ = "0.1.0"
