"""Building and publishing MQwen checkpoints (`python -m convert --help`)."""
