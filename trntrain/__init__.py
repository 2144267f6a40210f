"""trntrain: config-driven LLM training for AWS Trainium clusters."""

__version__ = "0.1.0"
